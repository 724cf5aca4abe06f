// PythonStep: takes the GIL for each batch and calls step_fn(*batch) -> loss tensor.
#include "python/python_step.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

namespace hotloop {
namespace py = pybind11;

PythonStep::PythonStep(py::function step_fn) : step_fn_(std::move(step_fn)) {}

PythonStep::~PythonStep() {
  // The callable may be released from a thread that does not hold the GIL.
  py::gil_scoped_acquire gil;
  step_fn_ = py::function();
}

at::Tensor PythonStep::run(const std::vector<at::Tensor>& batch) {
  py::gil_scoped_acquire gil;
  py::tuple args(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) args[i] = py::cast(batch[i]);
  py::object result = py::reinterpret_steal<py::object>(PyObject_Call(step_fn_.ptr(), args.ptr(), nullptr));
  if (!result) throw py::error_already_set();
  metrics_.clear();
  if (py::isinstance<py::tuple>(result)) {
    auto values = result.cast<py::tuple>();
    TORCH_CHECK(values.size() >= 1, "the python step returned an empty tuple");
    for (size_t i = 1; i < values.size(); ++i) {
      TORCH_CHECK(THPVariable_Check(values[i].ptr()), "train metric ", i - 1, " must be a tensor");
      metrics_.push_back(THPVariable_Unpack(values[i].ptr()));
    }
    result = values[0];
  }
  TORCH_CHECK(THPVariable_Check(result.ptr()), "the python step must return the loss tensor, got ",
              std::string(py::str(py::type::of(result))));
  at::Tensor loss = THPVariable_Unpack(result.ptr());
  TORCH_CHECK(loss.numel() == 1, "the loss must be a single value, got shape ", loss.sizes());
  return loss.dim() == 0 ? loss : loss.reshape({});
}

}  // namespace hotloop
