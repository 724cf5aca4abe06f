// Dataset: permutation per epoch exactly as torch.randperm(n, generator=g), batches by index_select.
#include "data/dataset.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

namespace hotloop {

Dataset::Dataset(std::vector<at::Tensor> tensors, int64_t batch_size, bool shuffle, bool drop_last,
                 std::optional<at::Generator> generator, bool reuse_buffers)
    : tensors_(std::move(tensors)),
      batch_size_(batch_size),
      shuffle_(shuffle),
      drop_last_(drop_last),
      generator_(std::move(generator)),
      reuse_buffers_(reuse_buffers) {
  TORCH_CHECK(!tensors_.empty(), "train_data must contain at least one tensor");
  TORCH_CHECK(batch_size_ >= 1, "batch_size must be >= 1, got ", batch_size_);
  const auto& first = tensors_.front();
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto& t = tensors_[i];
    TORCH_CHECK(t.defined(), "train_data[", i, "] is undefined");
    TORCH_CHECK(t.dim() >= 1, "train_data[", i, "] must have a sample dimension, got a 0-dim tensor");
    TORCH_CHECK(t.size(0) == first.size(0), "train_data tensors must have the same number of samples: ",
                "train_data[0] has ", first.size(0), ", train_data[", i, "] has ", t.size(0));
    TORCH_CHECK(t.device() == first.device(), "train_data tensors must be on one device: train_data[0] is on ",
                first.device(), ", train_data[", i, "] is on ", t.device());
  }
  num_samples_ = first.size(0);
  TORCH_CHECK(num_samples_ > 0, "train_data has zero samples");
  TORCH_CHECK(!drop_last_ || num_samples_ >= batch_size_, "drop_last=True with batch_size=", batch_size_,
              " larger than the ", num_samples_, " samples would leave no batch");
  if (shuffle_ && tensors_.size() > 0) {
    // Contiguous sources make index_select a plain row copy.
    for (auto& t : tensors_) t = t.contiguous();
  }
}

int64_t Dataset::epoch_length() const {
  return drop_last_ ? (length() / batch_size_) * batch_size_ : length();
}

int64_t Dataset::batches_per_epoch() const {
  return drop_last_ ? length() / batch_size_ : (length() + batch_size_ - 1) / batch_size_;
}

void Dataset::set_shard(int64_t world, int64_t rank, int64_t seed, bool drop_tail) {
  TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "rank ", rank, " is not in a world of ", world);
  TORCH_CHECK(!started_, "set_shard must come before the first batch");
  // DistributedSampler's num_samples: ceil((n - world) / world) when dropping an uneven tail, else
  // ceil(n / world).
  const int64_t per_rank = drop_tail ? num_samples_ / world : (num_samples_ + world - 1) / world;
  TORCH_CHECK(per_rank >= 1, "train_data has ", num_samples_, " samples, fewer than the ", world, " ranks");
  TORCH_CHECK(!drop_last_ || per_rank >= batch_size_, "drop_last=True with batch_size=", batch_size_,
              " larger than the ", per_rank, " samples of each rank would leave no batch");
  sharded_ = true;
  world_ = world;
  rank_ = rank;
  seed_ = seed;
  shard_samples_ = per_rank;
  for (auto& t : tensors_) t = t.contiguous();
}

at::Tensor Dataset::shard_order() const {
  const auto cpu_long = at::TensorOptions().dtype(at::kLong);
  at::Tensor order;
  if (shuffle_) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(seed_ + epochs_completed_);
    order = at::randperm(num_samples_, generator, cpu_long);
  } else {
    order = at::arange(num_samples_, cpu_long);
  }
  const int64_t total = shard_samples_ * world_;
  if (total > num_samples_) order = order.repeat({(total + num_samples_ - 1) / num_samples_});
  order = order.narrow(0, 0, total).slice(0, rank_, total, world_).contiguous();
  return order.to(device());
}

at::Tensor Dataset::gather(size_t which, const at::Tensor& index, int64_t start, int64_t count) {
  const auto& source = tensors_[which];
  if (!indexed()) return source.narrow(0, start, count);
  if (!reuse_buffers_) return at::index_select(source, 0, index);
  auto& buffers = count == batch_size_ ? full_buffers_ : tail_buffers_;
  if (buffers.size() != tensors_.size()) buffers.resize(tensors_.size());
  auto& dest = buffers[which];
  if (!dest.defined() || dest.size(0) != count) {
    auto sizes = source.sizes().vec();
    sizes[0] = count;
    dest = at::empty(sizes, source.options());
  }
  at::index_select_out(dest, source, 0, index);
  return dest;
}

int64_t Dataset::begin_batch() {
  if (position_ == 0 && sharded_) {
    order_ = shard_order();
  } else if (position_ == 0 && shuffle_) {
    auto options = at::TensorOptions().dtype(at::kLong).device(device());
    order_ = at::randperm(num_samples_, generator_, options);
  }
  started_ = true;
  return std::min(batch_size_, epoch_length() - position_);
}

void Dataset::end_batch(int64_t count) {
  position_ += count;
  ++batch_index_;
  if (position_ >= epoch_length()) {
    position_ = 0;
    batch_index_ = 0;
    ++epochs_completed_;
  }
}

std::vector<at::Tensor> Dataset::next_batch() {
  const int64_t count = begin_batch();
  at::Tensor index;
  if (indexed()) index = order_.narrow(0, position_, count);
  std::vector<at::Tensor> batch;
  batch.reserve(tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i) batch.push_back(gather(i, index, position_, count));
  end_batch(count);
  return batch;
}

at::Tensor Dataset::next_indices() {
  const int64_t count = begin_batch();
  if (!shuffle_ && !sequence_.defined()) {
    sequence_ = at::arange(num_samples_, at::TensorOptions().dtype(at::kLong).device(device()));
  }
  at::Tensor index = (indexed() ? order_ : sequence_).narrow(0, position_, count);
  end_batch(count);
  return index;
}

void Dataset::restore(const at::Tensor& order, int64_t batch_index, int64_t epochs_completed) {
  TORCH_CHECK(batch_index >= 0 && batch_index < batches_per_epoch(), "batch_index must be in [0, ",
              batches_per_epoch(), "), got ", batch_index);
  TORCH_CHECK(epochs_completed >= 0, "epochs_completed must be >= 0, got ", epochs_completed);
  if (sharded_ && batch_index > 0) {
    epochs_completed_ = epochs_completed;
    order_ = shard_order();  // a function of seed, epoch and rank: the same on any restart
  } else if (indexed() && batch_index > 0) {
    TORCH_CHECK(order.defined() && order.dim() == 1 && order.size(0) == length(),
                "order must be an epoch order of ", length(), " samples");
    order_ = order.to(device(), at::kLong);
  }
  batch_index_ = batch_index;
  position_ = batch_index * batch_size_;
  epochs_completed_ = epochs_completed;
  started_ = epochs_completed > 0 || batch_index > 0;
}

}  // namespace hotloop
