// AotStep: the aot engine's step, a whole training step (forward, backward, optimizer update) compiled by
// AOTInductor into a package and run on the user's own tensors; batch sizes without a package run natively.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/native_step.h"
#include "engine/step.h"
#include "engine/window_account.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace hotloop {

// The update a package was compiled with, and so the per-step scalars it takes (see aot_compile.py).
enum class AotUpdate { SGD, Adam };

class AotStep final : public DeviceStep {
 public:
  // native: the native step of the same model and optimizer; it runs every batch size that has no package
  // and owns the optimizer, whose groups (configured each window) give the state tensors and hyperparameters.
  // params, buffers: the tensors the packages take first, in the order of the native step's graphs.
  // state_lists: how many optimizer state tensors each parameter passes (SGD with momentum 1, Adam 2,
  // amsgrad 3, SGD without momentum 0).
  AotStep(std::shared_ptr<NativeStep> native, std::vector<at::Tensor> params, std::vector<at::Tensor> buffers,
          AotUpdate update, int64_t state_lists, int64_t num_metrics);
  ~AotStep() override;

  // Loads the package compiled for `batch_size` (replacing one loaded before).
  void add_package(int64_t batch_size, const std::string& path);
  void clear_packages();
  std::vector<int64_t> package_batch_sizes() const;
  // The model replaced tensors since (same shapes): point the packages and the native step at them.
  void bind(std::vector<at::Tensor> params, std::vector<at::Tensor> buffers);

  void begin_window(bool guard_nonfinite) override;
  StepOutcome run(Dataset& data) override;
  WindowTotals end_window() override;

  // Steps the packages took over this step's life (the rest ran natively).
  int64_t compiled_steps() const { return compiled_steps_; }

 private:
  struct Package {
    int64_t batch_size;
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  };
  Package* package_for(int64_t batch_size);
  // The per-step scalars: the guard's flag, then per parameter (the packages' order) its group's values for
  // this step of the window, computed in double as torch.optim computes them and stored in the params' dtype.
  void fill_hyper();
  // The optimizer's state tensors in the packages' order, read from its groups as configured for the window.
  void collect_state();

  std::shared_ptr<NativeStep> native_;
  std::vector<at::Tensor> params_, buffers_;
  AotUpdate update_;
  int64_t state_lists_;
  int64_t num_metrics_;
  std::vector<Package> packages_;
  // per parameter of the packages: its optimizer group and index there
  std::vector<std::pair<size_t, size_t>> slot_of_;
  std::vector<at::Tensor> state_;  // state_lists_ blocks of params_.size() tensors
  at::Tensor hyper_;
  std::vector<at::Tensor> inputs_;
  std::vector<at::Tensor> metrics_;
  std::vector<at::Tensor> last_grads_;  // of the window's last step when the package ran it
  bool guard_ = false;
  WindowAccount account_{false};
  int64_t compiled_steps_ = 0;
};

}  // namespace hotloop
