// The engine without Python: OpGraph against ATen, Dataset against randperm, the native optimizers against
// hand-computed updates, and the on-device window accounting against the host one (run here on CPU tensors).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "engine/loop.h"
#include "engine/native_step.h"
#include "engine/op_graph.h"
#include "optim/optimizer.h"
#include "optim/row_optimizer.h"

using namespace hotloop;

namespace {

int failures = 0;

#define EXPECT(cond)                                                                      \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      ++failures;                                                                         \
      std::fprintf(stderr, "  %s:%d: expected %s\n", __FILE__, __LINE__, #cond);          \
    }                                                                                     \
  } while (0)

#define EXPECT_THROWS(expr)                                                               \
  do {                                                                                    \
    bool threw = false;                                                                   \
    try {                                                                                 \
      expr;                                                                               \
    } catch (const c10::Error&) {                                                         \
      threw = true;                                                                       \
    }                                                                                     \
    if (!threw) {                                                                         \
      ++failures;                                                                         \
      std::fprintf(stderr, "  %s:%d: expected %s to throw\n", __FILE__, __LINE__, #expr); \
    }                                                                                     \
  } while (0)

bool same(const at::Tensor& a, const at::Tensor& b) {
  if (a.defined() != b.defined()) return false;
  return !a.defined() || (a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a, b));
}

bool close(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && at::allclose(a, b, 1e-6, 1e-6);
}

OpSpec op(std::string name, std::string overload, std::vector<OpArg> args, std::vector<int64_t> results,
          std::vector<int64_t> release = {}) {
  return OpSpec{std::move(name), std::move(overload), std::move(args), std::move(results), std::move(release), -1};
}

void op_graph_matches_aten() {
  const auto x = at::randn({4, 3});
  const auto w = at::randn({3, 5});
  const auto b = at::randn({5});
  OpGraph graph(3);
  graph.reserve_slots(7);
  graph.add_op(op("aten::mm", "", {OpArg::of_slot(0), OpArg::of_slot(1)}, {3}));
  graph.add_op(op("aten::add", "Tensor", {OpArg::of_slot(3), OpArg::of_slot(2), OpArg::of_constant(2.0)}, {4}, {3}));
  graph.add_op(op("aten::relu", "", {OpArg::of_slot(4)}, {5}, {4}));
  // A number where a Tensor goes is a wrapped scalar: the result stays float32.
  graph.add_op(op("aten::mul", "Tensor", {OpArg::of_slot(5), OpArg::of_constant(int64_t{3})}, {6}, {5}));
  graph.set_outputs({6}, {false});
  EXPECT(graph.num_outputs() == 1);
  EXPECT((graph.op_names() == std::vector<std::string>{"aten::mm.", "aten::add.Tensor", "aten::relu.", "aten::mul.Tensor"}));
  const auto expected = at::relu(at::mm(x, w) + 2.0 * b) * 3;
  for (int run = 0; run < 2; ++run) {
    const auto outputs = graph.call({x, w, b});
    EXPECT(outputs.size() == 1);
    EXPECT(outputs[0].scalar_type() == at::kFloat);
    EXPECT(close(outputs[0], expected));
  }
}

void op_graph_defaults_and_lists() {
  const auto a = at::randn({2, 3});
  const auto b = at::randn({2, 3});
  OpGraph graph(2);
  graph.reserve_slots(5);
  graph.add_op(op("aten::cat", "", {OpArg::of_list({0, 1}), OpArg::of_constant(int64_t{1})}, {2}));
  graph.add_op(op("aten::sum", "dim_IntList",
                  {OpArg::of_slot(2), OpArg::of_constant(std::vector<int64_t>{0}), OpArg::of_default(),
                   OpArg::of_default()},
                  {3}, {2}));
  graph.set_outputs({3}, {false});
  EXPECT(close(graph.call({a, b})[0], at::cat({a, b}, 1).sum(0)));
}

void op_graph_rejects_bad_ops() {
  OpGraph graph(1);
  graph.reserve_slots(2);
  EXPECT_THROWS(graph.add_op(op("aten::relu", "", {}, {1})));                                // argument count
  EXPECT_THROWS(graph.add_op(op("aten::relu", "", {OpArg::of_slot(5)}, {1})));               // slot range
  EXPECT_THROWS(graph.add_op(op("aten::relu", "", {OpArg::of_default()}, {1})));             // no default
  EXPECT_THROWS(graph.add_op(op("aten::relu", "", {OpArg::of_list({0})}, {1})));             // not a list
  EXPECT_THROWS(graph.add_op(op("aten::cat", "", {OpArg::of_list({-1}), OpArg::of_default()}, {1})));  // None
  EXPECT_THROWS(graph.add_op(op("aten::relu", "", {OpArg::of_slot(0)}, {1, 1})));            // returns
  EXPECT_THROWS(graph.add_op(op("aten::no_such_op", "", {}, {})));
  EXPECT_THROWS(graph.set_outputs({0, 1}, {false}));
}

void dataset_batches_are_the_randperm_split() {
  const int64_t n = 10, batch_size = 4;
  const auto ids = at::arange(n, at::kLong).mul(10).unsqueeze(1);
  Dataset data({ids}, batch_size, /*shuffle=*/true, /*drop_last=*/false, at::detail::createCPUGenerator(7),
               /*reuse_buffers=*/true);
  auto reference = at::detail::createCPUGenerator(7);
  for (int epoch = 0; epoch < 2; ++epoch) {
    const auto order = at::randperm(n, reference, at::TensorOptions().dtype(at::kLong));
    for (int64_t start = 0; start < n; start += batch_size) {
      const int64_t count = std::min(batch_size, n - start);
      const auto batch = data.next_batch();
      EXPECT(batch.size() == 1);
      EXPECT(same(batch[0], ids.index_select(0, order.narrow(0, start, count))));
      EXPECT(data.epoch_finished() == (start + count == n));
    }
    EXPECT(data.epochs_completed() == epoch + 1);
  }
  Dataset ordered({ids}, batch_size, /*shuffle=*/false, /*drop_last=*/true, std::nullopt, false);
  EXPECT(ordered.batches_per_epoch() == 2);
  EXPECT(same(ordered.next_batch()[0], ids.narrow(0, 0, 4)));
  EXPECT(same(ordered.next_indices(), at::arange(4, 8, at::kLong)));
  EXPECT(same(ordered.next_batch()[0], ids.narrow(0, 0, 4)));
}

void dataset_shards_cover_the_padded_permutation() {
  // DistributedSampler's layout: randperm(n) seeded seed + epoch, wrapped to a multiple of world,
  // then [rank::world]
  const int64_t n = 7, world = 3, seed = 5;
  const auto ids = at::arange(n, at::kLong).unsqueeze(1);
  for (int64_t rank = 0; rank < world; ++rank) {
    Dataset data({ids}, 2, /*shuffle=*/true, /*drop_last=*/false, std::nullopt, false);
    data.set_shard(world, rank, seed, /*drop_tail=*/false);
    EXPECT(data.shard_samples() == 3 && data.batches_per_epoch() == 2);
    for (int64_t epoch = 0; epoch < 2; ++epoch) {
      auto generator = at::detail::createCPUGenerator(seed + epoch);
      auto order = at::randperm(n, generator, at::TensorOptions().dtype(at::kLong));
      order = at::cat({order, order.narrow(0, 0, 2)}).slice(0, rank, 9, world);
      EXPECT(same(at::cat({data.next_indices(), data.next_indices()}), order));
    }
  }
  Dataset cut({ids}, 2, /*shuffle=*/false, /*drop_last=*/true, std::nullopt, false);
  cut.set_shard(world, 1, seed, /*drop_tail=*/true);
  EXPECT(cut.shard_samples() == 2 && cut.batches_per_epoch() == 1);
  EXPECT(same(cut.next_indices(), at::tensor({int64_t{1}, int64_t{4}})));
  EXPECT_THROWS(cut.set_shard(world, 0, seed, true));  // after the first batch
}

std::shared_ptr<NativeOptimizer> sgd(const at::Tensor& param, bool fused, double lr, double momentum) {
  auto optimizer = std::make_shared<SGD>(fused);
  OptimizerGroup group;
  group.params = {param};
  group.grad_index = {0};
  group.lr = lr;
  group.momentum = momentum;
  if (momentum != 0.0) {
    group.momentum_buffers = {at::zeros_like(param)};
    group.buffer_is_new = {true};
  }
  optimizer->configure({group}, 1);
  return optimizer;
}

std::shared_ptr<NativeOptimizer> adam(const at::Tensor& param, bool fused, double lr) {
  auto optimizer = std::make_shared<Adam>(fused);
  OptimizerGroup group;
  group.params = {param};
  group.grad_index = {0};
  group.lr = lr;
  group.exp_avgs = {at::zeros_like(param)};
  group.exp_avg_sqs = {at::zeros_like(param)};
  group.steps = {at::zeros({}, at::kFloat)};
  optimizer->configure({group}, 1);
  return optimizer;
}

void sgd_step_is_the_hand_computed_update() {
  for (bool fused : {true, false}) {
    const auto start = at::randn({5});
    const auto g1 = at::randn({5});
    const auto g2 = at::randn({5});
    auto plain = start.clone();
    auto optimizer = sgd(plain, fused, 0.1, 0.0);
    optimizer->step({g1});
    EXPECT(close(plain, start - 0.1 * g1));

    auto with_momentum = start.clone();
    optimizer = sgd(with_momentum, fused, 0.1, 0.9);
    optimizer->step({g1});
    optimizer->step({g2});
    // torch.optim.SGD: the first buffer is the gradient, then buf = momentum * buf + grad.
    EXPECT(close(with_momentum, start - 0.1 * g1 - 0.1 * (0.9 * g1 + g2)));
    EXPECT(close(optimizer->groups()[0].momentum_buffers[0], 0.9 * g1 + g2));
    EXPECT(optimizer->steps_in_window() == 2);
    EXPECT_THROWS(optimizer->step({}));
  }
}

// A linear model w of 3 weights with loss mean(x @ w), whose gradient is mean(x, 0), as a captured graph.
std::shared_ptr<OpGraph> linear_mean_graph() {
  auto graph = std::make_shared<OpGraph>(2);  // w, x
  graph->reserve_slots(5);
  graph->add_op(op("aten::mv", "", {OpArg::of_slot(1), OpArg::of_slot(0)}, {2}));
  graph->add_op(op("aten::mean", "", {OpArg::of_slot(2), OpArg::of_default()}, {3}, {2}));
  graph->add_op(op("aten::mean", "dim",
                   {OpArg::of_slot(1), OpArg::of_constant(std::vector<int64_t>{0}), OpArg::of_default(),
                    OpArg::of_default()},
                   {4}));
  graph->set_outputs({4, 3}, {false, false});  // (grad, loss)
  return graph;
}

struct GuardedRun {
  WindowStats stats;
  at::Tensor weight, grad, step_count;
  int64_t steps_in_window = 0, steps = 0, total_steps = 0;
};

GuardedRun run_guarded(const at::Tensor& x, bool use_adam, bool fused, bool on_device) {
  auto weight = at::ones({3}).requires_grad_(true);
  auto optimizer = use_adam ? adam(weight, fused, 0.1) : sgd(weight, fused, 0.1, 0.9);
  auto step = std::make_shared<NativeStep>(std::vector<at::Tensor>{weight}, std::vector<at::Tensor>{},
                                           std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>>{
                                               {2, linear_mean_graph()}},
                                           std::vector<std::vector<int64_t>>{{3}}, std::vector<bool>{false},
                                           optimizer, on_device);
  auto data = std::make_shared<Dataset>(std::vector<at::Tensor>{x}, 2, false, false, std::nullopt, false);
  Loop loop(data, std::static_pointer_cast<DeviceStep>(step));
  loop.set_guard_nonfinite(true);
  GuardedRun result;
  result.stats = loop.run(3, false);
  result.weight = weight.detach().clone();
  result.grad = weight.grad().defined() ? weight.grad().clone() : at::Tensor();
  if (use_adam) result.step_count = optimizer->groups()[0].steps[0].clone();
  result.steps_in_window = optimizer->steps_in_window();
  result.steps = step->steps();
  result.total_steps = loop.total_steps();
  return result;
}

void guard_on_the_device_equals_the_host_guard() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto finite_then_nan = at::randn({6, 3});
  finite_then_nan[3][1] = nan;  // the second batch
  auto nan_first = at::randn({6, 3});
  nan_first[0][0] = nan;
  for (bool use_adam : {false, true}) {
    for (bool fused : {true, false}) {
      for (int first_bad : {2, 1}) {
        const auto& x = first_bad == 2 ? finite_then_nan : nan_first;
        const auto host = run_guarded(x, use_adam, fused, false);
        const auto device = run_guarded(x, use_adam, fused, true);
        std::fprintf(stderr, "  %s fused=%d first bad step %d\n", use_adam ? "adam" : "sgd", fused, first_bad);
        EXPECT(host.stats.nonfinite_step == first_bad);
        EXPECT(host.stats.steps == first_bad - 1);
        for (const auto* run : {&host, &device}) {
          EXPECT(run->stats.nonfinite_step == first_bad);
          EXPECT(run->stats.steps == first_bad - 1);
          EXPECT(run->stats.samples == 2 * (first_bad - 1));
          EXPECT(run->steps_in_window == first_bad - 1);
          EXPECT(run->steps == first_bad - 1);
          EXPECT(run->total_steps == first_bad - 1);
          EXPECT(run->grad.defined() == (first_bad == 2));
          EXPECT(at::isfinite(run->weight).all().item<bool>());
        }
        EXPECT(same(device.weight, host.weight));
        EXPECT(same(device.grad, host.grad));
        EXPECT(same(device.step_count, host.step_count));
        EXPECT(std::abs(device.stats.loss_sum - host.stats.loss_sum) < 1e-9);
        if (first_bad == 2) {
          const auto mean = x.narrow(0, 0, 2).mean(0);
          EXPECT(close(host.grad, mean));
          EXPECT(std::abs(host.stats.loss_sum - 2 * at::mv(x.narrow(0, 0, 2), at::ones({3})).mean().item<double>()) <
                 1e-5);
          if (!use_adam) EXPECT(close(host.weight, at::ones({3}) - 0.1 * mean));
        } else {
          EXPECT(same(host.weight, at::ones({3})));
        }
      }
    }
  }
}

void loop_stops_at_epoch_end_and_on_interrupt() {
  auto weight = at::ones({3}).requires_grad_(true);
  auto step = std::make_shared<NativeStep>(
      std::vector<at::Tensor>{weight}, std::vector<at::Tensor>{},
      std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>>{{2, linear_mean_graph()}},
      std::vector<std::vector<int64_t>>{{3}}, std::vector<bool>{false}, sgd(weight, true, 0.01, 0.0));
  auto data = std::make_shared<Dataset>(std::vector<at::Tensor>{at::randn({6, 3})}, 2, true, false, std::nullopt,
                                        true);
  Loop loop(data, std::static_pointer_cast<DeviceStep>(step));
  EXPECT(loop.run(100, true).steps == 3);
  EXPECT(data->epochs_completed() == 1);
  EXPECT_THROWS(loop.run(0, false));
  bool interrupted = false;
  try {
    loop.run(100, false, [&] { loop.request_interrupt(); });
  } catch (const Interrupted&) {
    interrupted = true;
  }
  EXPECT(interrupted);
  EXPECT(loop.total_steps() == 4);  // stopped after the step in progress
}

void op_graph_reuses_outputs_through_out_variants() {
  auto graph = linear_mean_graph();
  graph->reuse_output(0, "out");  // mv: its result is read only inside the graph
  EXPECT(graph->reused_ops() == std::vector<std::string>{"aten::mv."});
  const auto w = at::randn({3});
  const auto x1 = at::randn({2, 3});
  const auto x2 = at::randn({2, 3});
  for (int run = 0; run < 2; ++run) {
    for (const auto& x : {x1, x2}) {
      const auto outputs = graph->call({w, x});
      EXPECT(same(outputs[0], x.mean(0)));
      EXPECT(same(outputs[1], at::mv(x, w).mean()));
    }
  }
  EXPECT_THROWS(graph->reuse_output(1, "out"));  // mean.out is mean.dim's out= variant, not mean's
  EXPECT_THROWS(graph->reuse_output(0, "nonexistent"));
  EXPECT_THROWS(graph->reuse_output(3, "out"));
}

void window_threads_are_restored_after_an_interrupt() {
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  auto weight = at::ones({3}).requires_grad_(true);
  auto step = std::make_shared<NativeStep>(
      std::vector<at::Tensor>{weight}, std::vector<at::Tensor>{},
      std::vector<std::pair<int64_t, std::shared_ptr<OpGraph>>>{{2, linear_mean_graph()}},
      std::vector<std::vector<int64_t>>{{3}}, std::vector<bool>{false}, sgd(weight, true, 0.01, 0.0));
  step->set_window_threads(1);
  EXPECT_THROWS(step->set_window_threads(-1));
  auto data = std::make_shared<Dataset>(std::vector<at::Tensor>{at::randn({6, 3})}, 2, true, false, std::nullopt,
                                        true);
  Loop loop(data, std::static_pointer_cast<DeviceStep>(step));
  std::vector<int> seen;
  EXPECT(loop.run(2, false, [&] { seen.push_back(at::get_num_threads()); }).steps == 2);
  EXPECT(at::get_num_threads() == 2);
  try {
    loop.run(100, false, [&] {
      seen.push_back(at::get_num_threads());
      loop.request_interrupt();
    });
  } catch (const Interrupted&) {
  }
  EXPECT(at::get_num_threads() == 2);
  EXPECT(seen == std::vector<int>({1, 1, 1}));
  at::set_num_threads(before);
}

}  // namespace

// fit_many's fused rows against torch.optim's single-tensor maths row by row (P = 21: the eight-wide loop and
// its scalar tail), per-row hyperparameters, and a row left out bitwise unchanged.
void row_optimizer_matches_per_row_reference() {
  const int64_t K = 3, P = 21;
  const std::vector<double> lr{0.01, 0.02, 0.03}, wd{0.1, 0.0, 0.05}, beta1{0.9, 0.8, 0.9},
      beta2{0.999, 0.99, 0.98}, eps{1e-8, 1e-6, 1e-8}, momentum{0.9, 0.0, 0.5}, dampening{0.0, 0.0, 0.1};
  for (const bool adam : {true, false}) {
    for (const bool decoupled : {false, true}) {
      if (!adam && decoupled) continue;
      at::Tensor param = at::randn({K, P}), last = at::zeros({K, P});
      std::vector<at::Tensor> state;
      if (adam) {
        state = {at::zeros({K, P}), at::zeros({K, P}), at::zeros({K, 1}, at::kDouble)};
      } else {
        state = {at::zeros({K, P}), at::ones({K, 1}, at::kBool)};
      }
      RowOptimizer rows(adam ? RowOptimizer::Kind::Adam : RowOptimizer::Kind::SGD, param, last, state, false, false,
                        false, decoupled);
      rows.set_hypers({lr, wd, momentum, dampening, beta1, beta2, eps});
      at::Tensor ref = param.clone(), m = at::zeros({K, P}), v = at::zeros({K, P}), buf = at::zeros({K, P});
      const at::Tensor frozen = param[1].clone();
      for (int step = 1; step <= 2; ++step) {
        const at::Tensor grad = at::randn({K, P});
        rows.step(grad, {true, false, true});
        for (int64_t k : {0, 2}) {
          at::Tensor p = ref[k], g = grad[k].clone();
          if (adam) {
            if (decoupled)
              p.mul_(1 - lr[k] * wd[k]);
            else
              g = g + p * wd[k];
            m[k].lerp_(g, 1 - beta1[k]);
            v[k].mul_(beta2[k]).addcmul_(g, g, 1 - beta2[k]);
            const double bc1 = 1 - std::pow(beta1[k], step), bc2 = 1 - std::pow(beta2[k], step);
            p.addcdiv_(m[k], (v[k].sqrt() / std::sqrt(bc2)).add_(eps[k]), -lr[k] / bc1);
          } else {
            g = g + p * wd[k];
            buf[k] = step == 1 ? g : buf[k] * momentum[k] + g * (1 - dampening[k]);
            p.add_(buf[k], -lr[k]);
          }
        }
        EXPECT(at::allclose(param[0], ref[0], 1e-5, 1e-6) && at::allclose(param[2], ref[2], 1e-5, 1e-6));
        EXPECT(same(param[1], frozen));
        EXPECT(same(last[0], grad[0]) && same(last[2], grad[2]));
      }
      if (adam) EXPECT(same(state[2], at::tensor({2.0, 0.0, 2.0}, at::kDouble).reshape({K, 1})));
    }
  }
}

// The aot step applies an update itself and then records it: the optimizer's counters move as after step().
void recorded_step_counts_like_a_step() {
  const auto start = at::randn({5});
  const auto g1 = at::randn({5});
  const auto g2 = at::randn({5});
  auto stepped = start.clone();
  auto reference = sgd(stepped, false, 0.1, 0.9);
  reference->step({g1});
  reference->step({g2});

  auto recorded = start.clone();
  auto optimizer = sgd(recorded, false, 0.1, 0.9);
  optimizer->groups().front().momentum_buffers.front().copy_(g1);  // what the first step leaves
  recorded.sub_(0.1 * g1);
  optimizer->record_step();
  EXPECT(optimizer->steps_in_window() == 1 && !optimizer->groups().front().buffer_is_new.front());
  optimizer->step({g2});  // a second step: momentum from the recorded buffer, not a fresh one
  EXPECT(close(recorded, stepped));

  auto param = start.clone();
  auto with_steps = adam(param, false, 0.01);
  with_steps->record_step();
  with_steps->record_step();
  EXPECT(with_steps->steps_in_window() == 2);
  EXPECT(with_steps->groups().front().steps.front().item<float>() == 2.0f);
  EXPECT(same(param, start));  // recording updates nothing
}

int main() {
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"op_graph_matches_aten", op_graph_matches_aten},
      {"op_graph_defaults_and_lists", op_graph_defaults_and_lists},
      {"op_graph_rejects_bad_ops", op_graph_rejects_bad_ops},
      {"dataset_batches_are_the_randperm_split", dataset_batches_are_the_randperm_split},
      {"dataset_shards_cover_the_padded_permutation", dataset_shards_cover_the_padded_permutation},
      {"sgd_step_is_the_hand_computed_update", sgd_step_is_the_hand_computed_update},
      {"guard_on_the_device_equals_the_host_guard", guard_on_the_device_equals_the_host_guard},
      {"loop_stops_at_epoch_end_and_on_interrupt", loop_stops_at_epoch_end_and_on_interrupt},
      {"row_optimizer_matches_per_row_reference", row_optimizer_matches_per_row_reference},
      {"recorded_step_counts_like_a_step", recorded_step_counts_like_a_step},
      {"op_graph_reuses_outputs_through_out_variants", op_graph_reuses_outputs_through_out_variants},
      {"window_threads_are_restored_after_an_interrupt", window_threads_are_restored_after_an_interrupt},
  };
  at::manual_seed(0);
  for (const auto& [name, test] : tests) {
    const int before = failures;
    try {
      test();
    } catch (const std::exception& e) {
      ++failures;
      std::fprintf(stderr, "  threw: %s\n", e.what());
    }
    std::printf("%s %s\n", failures == before ? "PASS" : "FAIL", name);
  }
  std::printf("%d failed expectation(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
