// account_step: one single-thread kernel instead of the half dozen small ATen ops it replaces per step.
#include "cuda/step_accounting.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace hotloop {

namespace {

template <typename T>
__global__ void account_step_kernel(const T* loss, const double* metrics, int64_t num_metrics, double* sums,
                                    float* found_inf, double weight, bool guard) {
  const double value = static_cast<double>(static_cast<at::opmath_type<T>>(*loss));
  if (guard) {
    if (!isfinite(value)) *found_inf = 1.0f;
    if (*found_inf != 0.0f) return;
  }
  sums[0] += value * weight;
  sums[1] += 1.0;
  for (int64_t i = 0; i < num_metrics; ++i) sums[2 + i] += metrics[i] * weight;
}

}  // namespace

void account_step(const at::Tensor& loss, const std::optional<at::Tensor>& metrics, const at::Tensor& sums,
                  const at::Tensor& found_inf, double weight, bool guard) {
  TORCH_CHECK(loss.is_cuda() && loss.numel() == 1 && at::isFloatingType(loss.scalar_type()),
              "account_step: the loss must be a one-element floating point CUDA tensor, got ", loss.toString(),
              loss.sizes());
  const int64_t num_metrics = metrics.has_value() ? metrics->numel() : 0;
  TORCH_CHECK(sums.device() == loss.device() && sums.scalar_type() == at::kDouble && sums.is_contiguous() &&
                  sums.numel() == 2 + num_metrics,
              "account_step: sums must be a contiguous float64 tensor of ", 2 + num_metrics,
              " elements on the loss's device");
  TORCH_CHECK(found_inf.device() == loss.device() && found_inf.scalar_type() == at::kFloat &&
                  found_inf.numel() == 1,
              "account_step: found_inf must be a one-element float32 tensor on the loss's device");
  if (metrics.has_value()) {
    TORCH_CHECK(metrics->device() == loss.device() && metrics->scalar_type() == at::kDouble &&
                    metrics->is_contiguous(),
                "account_step: metrics must be a contiguous float64 tensor on the loss's device");
  }
  const c10::cuda::CUDAGuard device_guard(loss.device());
  const at::Tensor loss_value = loss.reshape({}).contiguous();
  const double* metric_values = metrics.has_value() ? metrics->const_data_ptr<double>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss_value.scalar_type(), "account_step", [&] {
    account_step_kernel<scalar_t><<<1, 1, 0, stream>>>(loss_value.const_data_ptr<scalar_t>(), metric_values,
                                                       num_metrics, sums.data_ptr<double>(),
                                                       found_inf.data_ptr<float>(), weight, guard);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hotloop
