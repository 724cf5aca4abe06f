// The hotloop._C module: bindings only; the logic lives in data/, engine/ and optim/, and the Python-facing
// pieces (the Python step, Ctrl-C polling, the op tuple format) in python/.
#include <torch/csrc/utils/pybind.h>
#include <torch/python.h>

#include "data/dataset.h"
#include "engine/aot_step.h"
#include "engine/evaluator.h"
#include "engine/interrupt.h"
#include "engine/loop.h"
#include "engine/many_step.h"
#include "engine/native_step.h"
#include "engine/op_graph.h"
#include "optim/for_loop.h"
#include "optim/optimizer.h"
#include "optim/row_optimizer.h"
#include "python/op_spec.h"
#include "python/python_step.h"
#include "python/signal_check.h"
#ifdef HOTLOOP_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>

#include "cuda/graph_step.h"
#include "cuda/step_accounting.h"
#endif

namespace py = pybind11;
using namespace hotloop;

PYBIND11_MODULE(_C, m) {
  m.doc() = "hotloop's native inner loop";
  py::register_local_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const Interrupted&) {
      PyErr_SetNone(PyExc_KeyboardInterrupt);
    }
  });
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
      .def("next_indices", &Dataset::next_indices)
      .def("restore", &Dataset::restore, py::arg("order"), py::arg("batch_index"), py::arg("epochs_completed"))
      .def("set_shard", &Dataset::set_shard, py::arg("world"), py::arg("rank"), py::arg("seed"), py::arg("drop_tail"))
      .def_property_readonly("shard_samples", &Dataset::shard_samples);

  py::class_<HostStep, std::shared_ptr<HostStep>>(m, "HostStep");
  py::class_<DeviceStep, std::shared_ptr<DeviceStep>>(m, "DeviceStep");
  py::class_<PythonStep, HostStep, std::shared_ptr<PythonStep>>(m, "PythonStep")
      .def(py::init<py::function>(), py::arg("step_fn"));

  py::class_<WindowStats>(m, "WindowStats")
      .def_readonly("loss_sum", &WindowStats::loss_sum)
      .def_readonly("samples", &WindowStats::samples)
      .def_readonly("steps", &WindowStats::steps)
      .def_readonly("metric_sums", &WindowStats::metric_sums)
      .def_readonly("nonfinite_step", &WindowStats::nonfinite_step);

  py::class_<Loop>(m, "Loop")
      .def(py::init<std::shared_ptr<Dataset>, std::shared_ptr<HostStep>>(), py::arg("dataset"), py::arg("step"))
      .def(py::init<std::shared_ptr<Dataset>, std::shared_ptr<DeviceStep>>(), py::arg("dataset"), py::arg("step"))
      .def(
          "run",
          [](Loop& loop, int64_t max_steps, bool stop_at_epoch_end) {
            return loop.run(max_steps, stop_at_epoch_end, python_signal_poll());
          },
          py::arg("max_steps"), py::arg("stop_at_epoch_end"), py::call_guard<py::gil_scoped_release>())
      .def("request_interrupt", &Loop::request_interrupt)
      .def("clear_interrupt", &Loop::clear_interrupt)
      .def("set_guard_nonfinite", &Loop::set_guard_nonfinite, py::arg("guard"))
      .def_property_readonly("total_steps", &Loop::total_steps)
      .def_static("live_count", &Loop::live_count);

  // Native engine: the lowered joint graph (built by hotloop.capture).
  py::class_<OpGraph, std::shared_ptr<OpGraph>>(m, "OpGraph")
      .def(py::init<int64_t>(), py::arg("num_inputs"))
      .def("reserve_slots", &OpGraph::reserve_slots, py::arg("count"))
      .def("set_constant", &OpGraph::set_constant, py::arg("slot"), py::arg("value"))
      .def(
          "add_op",
          [](OpGraph& graph, const std::string& name, const std::string& overload, const py::list& args,
             std::vector<int64_t> results, std::vector<int64_t> release, int64_t unpacked_list_size) {
            graph.add_op(op_spec_from_python(name, overload, args, std::move(results), std::move(release),
                                             unpacked_list_size));
          },
          py::arg("name"), py::arg("overload"), py::arg("args"), py::arg("results"), py::arg("release"),
          py::arg("unpacked_list_size"))
      .def("set_outputs", &OpGraph::set_outputs, py::arg("slots"), py::arg("copy"))
      .def("reuse_output", &OpGraph::reuse_output, py::arg("op"), py::arg("out_overload"))
      .def("__call__", &OpGraph::call, py::arg("inputs"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_inputs", &OpGraph::num_inputs)
      .def_property_readonly("num_outputs", &OpGraph::num_outputs)
      .def_property_readonly("op_names", &OpGraph::op_names)
      .def_property_readonly("reused_ops", &OpGraph::reused_ops);
  // Native batched evaluation (built by hotloop.native_eval).
  py::class_<Evaluator, std::shared_ptr<Evaluator>>(m, "Evaluator")
      .def(py::init<std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, int64_t>(),
           py::arg("graphs"), py::arg("model_tensors"), py::arg("data"), py::arg("batch_size"))
      .def("bind", &Evaluator::bind, py::arg("model_tensors"))
      .def(
          "run", [](Evaluator& evaluator) { return evaluator.run(python_signal_poll()); },
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_samples", &Evaluator::num_samples)
      .def_property_readonly("batch_size", &Evaluator::batch_size)
      .def_property_readonly("num_metrics", &Evaluator::num_metrics)
      .def_property_readonly("batches_run", &Evaluator::batches_run);
  py::class_<NativeStep, DeviceStep, std::shared_ptr<NativeStep>>(m, "NativeStep")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>>, std::vector<std::vector<int64_t>>,
                    std::vector<bool>, std::shared_ptr<NativeOptimizer>>(),
           py::arg("params"), py::arg("state"), py::arg("graphs"), py::arg("sample_shapes"), py::arg("accumulate"),
           py::arg("optimizer"))
      .def("bind", &NativeStep::bind, py::arg("params"), py::arg("state"))
      .def("set_accumulate", &NativeStep::set_accumulate, py::arg("accumulate"))
      .def("set_graphs", &NativeStep::set_graphs, py::arg("graphs"))
      .def_property("window_threads", &NativeStep::window_threads, &NativeStep::set_window_threads)
      .def_property_readonly("steps", &NativeStep::steps)
      .def_property_readonly("optimizer", &NativeStep::optimizer);

  // fit_many's stacked step (built by hotloop.many): per-window schedules, per-model freeze.
  py::class_<ManyStep, DeviceStep, std::shared_ptr<ManyStep>>(m, "ManyStep")
      .def(py::init<std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>>, std::vector<at::Tensor>, int64_t,
                    at::Tensor, bool, bool>(),
           py::arg("step_graphs"), py::arg("step_inputs"), py::arg("index_slot"), py::arg("applied"),
           py::arg("guard"), py::arg("raise_on_nonfinite"))
      .def(
          "set_updates",
          [](ManyStep& step, std::shared_ptr<OpGraph> update_all, const std::vector<at::Tensor>& all_inputs,
             std::shared_ptr<OpGraph> update_rows, const std::vector<at::Tensor>& rows_inputs,
             std::optional<at::Tensor> fresh, std::optional<at::Tensor> needs_fresh) {
            step.set_updates(std::move(update_all), all_inputs, std::move(update_rows), rows_inputs,
                             fresh.value_or(at::Tensor()), needs_fresh.value_or(at::Tensor()));
          },
          py::arg("update_all"), py::arg("all_inputs"), py::arg("update_rows"), py::arg("rows_inputs"),
          py::arg("fresh"), py::arg("needs_fresh"))
      .def(
          "set_window",
          [](ManyStep& step, std::vector<at::Tensor> indices, const std::vector<std::optional<at::Tensor>>& taking,
             std::vector<bool> active) {
            std::vector<at::Tensor> masks;
            masks.reserve(taking.size());
            for (const auto& mask : taking) masks.push_back(mask.value_or(at::Tensor()));
            step.set_window(std::move(indices), std::move(masks), std::move(active));
          },
          py::arg("indices"), py::arg("taking"), py::arg("active"))
      .def("set_row_optimizer", &ManyStep::set_row_optimizer, py::arg("optimizer"))
      .def_property_readonly("position", &ManyStep::position)
      .def_property_readonly("active", &ManyStep::active)
      .def_property_readonly("nonfinite_steps", &ManyStep::nonfinite_steps)
      .def_property_readonly("raised_model", &ManyStep::raised_model)
      .def_property_readonly("raised_step", &ManyStep::raised_step);

  py::class_<RowOptimizer, std::shared_ptr<RowOptimizer>>(m, "RowOptimizer")
      .def(py::init([](const std::string& kind, at::Tensor param, at::Tensor last_grad, std::vector<at::Tensor> state,
                       bool maximize, bool nesterov, bool amsgrad, bool decoupled) {
             TORCH_CHECK(kind == "sgd" || kind == "adam", "RowOptimizer kind must be 'sgd' or 'adam', got ", kind);
             return std::make_shared<RowOptimizer>(kind == "sgd" ? RowOptimizer::Kind::SGD : RowOptimizer::Kind::Adam,
                                                   std::move(param), std::move(last_grad), std::move(state),
                                                   maximize, nesterov, amsgrad, decoupled);
           }),
           py::arg("kind"), py::arg("param"), py::arg("last_grad"), py::arg("state"), py::arg("maximize"),
           py::arg("nesterov"), py::arg("amsgrad"), py::arg("decoupled"))
      .def(
          "set_hypers",
          [](RowOptimizer& optimizer, std::vector<double> lr, std::vector<double> weight_decay,
             std::vector<double> momentum, std::vector<double> dampening, std::vector<double> beta1,
             std::vector<double> beta2, std::vector<double> eps) {
            optimizer.set_hypers({std::move(lr), std::move(weight_decay), std::move(momentum), std::move(dampening),
                                  std::move(beta1), std::move(beta2), std::move(eps)});
          },
          py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"), py::arg("beta1"),
          py::arg("beta2"), py::arg("eps"))
      .def("step", &RowOptimizer::step, py::arg("grad"), py::arg("on"), py::call_guard<py::gil_scoped_release>());

  // The aot engine: packages compiled by hotloop.aot_compile, the native step for the other batch sizes.
  py::enum_<AotUpdate>(m, "AotUpdate").value("SGD", AotUpdate::SGD).value("Adam", AotUpdate::Adam);
  py::class_<AotStep, DeviceStep, std::shared_ptr<AotStep>>(m, "AotStep")
      .def(py::init<std::shared_ptr<NativeStep>, std::vector<at::Tensor>, std::vector<at::Tensor>, AotUpdate, int64_t,
                    int64_t>(),
           py::arg("native"), py::arg("params"), py::arg("buffers"), py::arg("update"), py::arg("state_lists"),
           py::arg("num_metrics"))
      .def("add_package", &AotStep::add_package, py::arg("batch_size"), py::arg("path"),
           py::call_guard<py::gil_scoped_release>())
      .def("clear_packages", &AotStep::clear_packages)
      .def_property_readonly("package_batch_sizes", &AotStep::package_batch_sizes)
      .def("bind", &AotStep::bind, py::arg("params"), py::arg("buffers"))
      .def_property_readonly("compiled_steps", &AotStep::compiled_steps);

  // Native optimizers: hotloop.optim builds them and configures them at every window boundary.
  py::class_<OptimizerGroup>(m, "OptimizerGroup")
      .def(py::init<>())
      .def_readwrite("params", &OptimizerGroup::params)
      .def_readwrite("grad_index", &OptimizerGroup::grad_index)
      .def_readwrite("lr", &OptimizerGroup::lr)
      .def_readwrite("lr_per_step", &OptimizerGroup::lr_per_step)
      .def_readwrite("momentum_per_step", &OptimizerGroup::momentum_per_step)
      .def_readwrite("weight_decay", &OptimizerGroup::weight_decay)
      .def_readwrite("maximize", &OptimizerGroup::maximize)
      .def_readwrite("momentum", &OptimizerGroup::momentum)
      .def_readwrite("dampening", &OptimizerGroup::dampening)
      .def_readwrite("nesterov", &OptimizerGroup::nesterov)
      .def_readwrite("momentum_buffers", &OptimizerGroup::momentum_buffers)
      .def_readwrite("buffer_is_new", &OptimizerGroup::buffer_is_new)
      .def_readwrite("beta1", &OptimizerGroup::beta1)
      .def_readwrite("beta2", &OptimizerGroup::beta2)
      .def_readwrite("eps", &OptimizerGroup::eps)
      .def_readwrite("amsgrad", &OptimizerGroup::amsgrad)
      .def_readwrite("decoupled_weight_decay", &OptimizerGroup::decoupled_weight_decay)
      .def_readwrite("exp_avgs", &OptimizerGroup::exp_avgs)
      .def_readwrite("exp_avg_sqs", &OptimizerGroup::exp_avg_sqs)
      .def_readwrite("max_exp_avg_sqs", &OptimizerGroup::max_exp_avg_sqs)
      .def_readwrite("steps", &OptimizerGroup::steps)
      .def_readwrite("state", &OptimizerGroup::state)
      .def_readwrite("options", &OptimizerGroup::options);
  py::class_<NativeOptimizer, std::shared_ptr<NativeOptimizer>>(m, "NativeOptimizer")
      .def("configure", &NativeOptimizer::configure, py::arg("groups"), py::arg("num_grads"))
      .def(
          "step", [](NativeOptimizer& optimizer, const std::vector<at::Tensor>& grads) { optimizer.step(grads); },
          py::arg("grads"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("fused", &NativeOptimizer::fused)
      .def_property_readonly("steps_in_window", &NativeOptimizer::steps_in_window)
      .def_property_readonly("groups", &NativeOptimizer::groups);
  py::class_<SGD, NativeOptimizer, std::shared_ptr<SGD>>(m, "SGD")
      .def(py::init<bool>(), py::arg("fused") = true);
  py::class_<Adam, NativeOptimizer, std::shared_ptr<Adam>>(m, "Adam")
      .def(py::init<bool>(), py::arg("fused") = true);
  py::class_<Adagrad, NativeOptimizer, std::shared_ptr<Adagrad>>(m, "Adagrad")
      .def(py::init<bool>(), py::arg("fused") = true);
  py::class_<RMSprop, NativeOptimizer, std::shared_ptr<RMSprop>>(m, "RMSprop").def(py::init<>());
  py::class_<Adamax, NativeOptimizer, std::shared_ptr<Adamax>>(m, "Adamax").def(py::init<>());
  py::class_<NAdam, NativeOptimizer, std::shared_ptr<NAdam>>(m, "NAdam").def(py::init<>());
  py::class_<RAdam, NativeOptimizer, std::shared_ptr<RAdam>>(m, "RAdam").def(py::init<>());
  py::class_<ASGD, NativeOptimizer, std::shared_ptr<ASGD>>(m, "ASGD").def(py::init<>());
  py::class_<Rprop, NativeOptimizer, std::shared_ptr<Rprop>>(m, "Rprop").def(py::init<>());
  py::class_<Adadelta, NativeOptimizer, std::shared_ptr<Adadelta>>(m, "Adadelta")
      .def(py::init<>());

#ifdef HOTLOOP_WITH_CUDA
  // Graph engine (built by hotloop.graph). The graphs are torch.cuda.CUDAGraph objects: torch binds
  // at::cuda::CUDAGraph with a shared_ptr holder, and this module shares torch's pybind11 internals.
  py::class_<GraphStep, DeviceStep, std::shared_ptr<GraphStep>>(m, "GraphStep")
      .def(py::init<std::vector<std::shared_ptr<at::cuda::CUDAGraph>>, std::vector<at::Tensor>, at::Tensor,
                    at::Tensor, bool, std::vector<at::Tensor>>(),
           py::arg("graphs"), py::arg("index_buffers"), py::arg("sums"), py::arg("found_inf"),
           py::arg("guard_nonfinite"), py::arg("keep_alive"))
      .def_property_readonly("replays", &GraphStep::replays)
      .def_static("account_step", &account_step, py::arg("loss"), py::arg("metrics"), py::arg("sums"),
                  py::arg("found_inf"), py::arg("weight"), py::arg("guard"));
#endif
}
