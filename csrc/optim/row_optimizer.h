// RowOptimizer: fit_many's fused update, one pass over K models' flat [K, P] rows with per-model
// hyperparameters (torch's fused kernels take one lr for all tensors), for optimizers built fused=True.
// Rows that do not take the step stay bitwise unchanged.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace hotloop {

// Per model k: hyperparameters of its (single) param group. SGD reads lr, weight_decay, momentum,
// dampening; Adam/AdamW read lr, weight_decay, beta1, beta2, eps.
struct RowHypers {
  std::vector<double> lr, weight_decay, momentum, dampening, beta1, beta2, eps;
};

class RowOptimizer {
 public:
  enum class Kind { SGD, Adam };

  // param: [K, P] rows updated in place; last_grad: [K, P], each stepped row gets its gradient (the .grad a
  // plain loop leaves). SGD state: {momentum_buffer [K, P], fresh [K, 1] bool (no buffer yet)}. Adam state:
  // {exp_avg, exp_avg_sq [K, P], steps [K, 1] float64[, max_exp_avg_sq [K, P] with amsgrad]}.
  // decoupled: AdamW's weight decay.
  RowOptimizer(Kind kind, at::Tensor param, at::Tensor last_grad, std::vector<at::Tensor> state, bool maximize,
               bool nesterov, bool amsgrad, bool decoupled);

  void set_hypers(RowHypers hypers);
  // One step of the rows with on[k] set (every row when `on` is empty).
  void step(const at::Tensor& grad, const std::vector<bool>& on);

 private:
  template <typename T>
  void sgd_row(int64_t k, const T* grad);
  template <typename T>
  void adam_row(int64_t k, const T* grad);
  bool avx2_;  // the element loops run their AVX2 build

  Kind kind_;
  at::Tensor param_, last_grad_;
  std::vector<at::Tensor> state_;
  bool maximize_, nesterov_, amsgrad_, decoupled_;
  int64_t K_, P_;
  RowHypers hypers_;
};

}  // namespace hotloop
