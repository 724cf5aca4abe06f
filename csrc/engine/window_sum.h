// WindowSum: a sample-weighted sum over one window's steps, kept where the values live.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace hotloop {

// The value of a single-element CPU float tensor, read in place: no dispatcher round trip, which on a
// small model is a measurable share of a step. nullopt for any other tensor.
inline std::optional<double> read_cpu_scalar(const at::Tensor& value) {
  if (!value.device().is_cpu() || value.numel() != 1) return std::nullopt;
  if (value.scalar_type() == at::kFloat) return *value.const_data_ptr<float>();
  if (value.scalar_type() == at::kDouble) return *value.const_data_ptr<double>();
  return std::nullopt;
}

// Whether a single-value loss is finite: read in place for a CPU float, else a synchronising read.
inline bool loss_is_finite(const at::Tensor& loss) {
  if (auto value = read_cpu_scalar(loss)) return std::isfinite(*value);
  return std::isfinite(loss.item<double>());
}

// CPU values are summed in a host double; values on an accelerator in a float64 device tensor, read once
// when the window ends.
class WindowSum {
 public:
  void reset() {
    host_ = 0.0;
    if (device_.defined()) device_.zero_();
  }

  void add(const at::Tensor& value, double weight) {
    if (auto scalar = read_cpu_scalar(value)) {
      host_ += *scalar * weight;
      return;
    }
    if (!device_.defined()) device_ = at::zeros({}, value.options().dtype(at::kDouble));
    device_.add_(value.detach().reshape({}), weight);
  }

  double total() const { return host_ + (device_.defined() ? device_.item<double>() : 0.0); }

 private:
  double host_ = 0.0;
  at::Tensor device_;
};

}  // namespace hotloop
