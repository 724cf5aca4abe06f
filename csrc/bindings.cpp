// The hotloop._C module: bindings only; the logic lives in data/, engine/ and optim/.
#include <torch/csrc/utils/pybind.h>
#include <torch/python.h>

#include "data/dataset.h"
#include "engine/loop.h"
#include "engine/python_step.h"

namespace py = pybind11;
using namespace hotloop;

PYBIND11_MODULE(_C, m) {
  m.doc() = "hotloop's native inner loop";
  m.attr("TORCH_VERSION") = HOTLOOP_TORCH_VERSION;
#ifdef HOTLOOP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif

  py::class_<Dataset, std::shared_ptr<Dataset>>(m, "Dataset")
      .def(py::init<std::vector<at::Tensor>, int64_t, bool, bool, std::optional<at::Generator>, bool>(),
           py::arg("tensors"), py::arg("batch_size"), py::arg("shuffle"), py::arg("drop_last"),
           py::arg("generator"), py::arg("reuse_buffers"))
      .def_property_readonly("num_samples", &Dataset::num_samples)
      .def_property_readonly("batches_per_epoch", &Dataset::batches_per_epoch)
      .def_property_readonly("epochs_completed", &Dataset::epochs_completed)
      .def_property_readonly("batch_index", &Dataset::batch_index)
      .def_property_readonly("epoch_order", &Dataset::epoch_order)
      .def("next_batch", &Dataset::next_batch)
      .def("restore", &Dataset::restore, py::arg("order"), py::arg("batch_index"), py::arg("epochs_completed"));

  py::class_<Step, std::shared_ptr<Step>>(m, "Step");
  py::class_<PythonStep, Step, std::shared_ptr<PythonStep>>(m, "PythonStep")
      .def(py::init<py::function>(), py::arg("step_fn"));

  py::class_<WindowStats>(m, "WindowStats")
      .def_readonly("loss_sum", &WindowStats::loss_sum)
      .def_readonly("samples", &WindowStats::samples)
      .def_readonly("steps", &WindowStats::steps)
      .def_readonly("epochs_completed", &WindowStats::epochs_completed)
      .def_readonly("wall_time_sec", &WindowStats::wall_time_sec)
      .def_readonly("epoch_ended", &WindowStats::epoch_ended);

  py::class_<Loop>(m, "Loop")
      .def(py::init<std::shared_ptr<Dataset>, std::shared_ptr<Step>>(), py::arg("dataset"), py::arg("step"))
      .def("run", &Loop::run, py::arg("max_steps"), py::arg("stop_at_epoch_end"))
      .def("request_interrupt", &Loop::request_interrupt)
      .def_property_readonly("total_steps", &Loop::total_steps)
      .def_static("live_count", &Loop::live_count);
}
