// Dataset: the aligned training tensors on one device, the epoch permutation and the batch gather.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace hotloop {

class Dataset {
 public:
  Dataset(std::vector<at::Tensor> tensors, int64_t batch_size, bool shuffle, bool drop_last,
          std::optional<at::Generator> generator, bool reuse_buffers);

  int64_t num_samples() const { return num_samples_; }
  int64_t batch_size() const { return batch_size_; }
  int64_t batches_per_epoch() const;
  const std::vector<at::Tensor>& tensors() const { return tensors_; }
  at::Device device() const { return tensors_.front().device(); }

  // The next batch of every tensor, aligned. Draws the epoch's permutation lazily at the first batch of
  // an epoch, so the generator is consumed exactly when an eager loop would consume it.
  std::vector<at::Tensor> next_batch();
  // The sample indices of the next batch (long, on the data's device), advancing exactly as next_batch()
  // does, for steps that gather on their own.
  at::Tensor next_indices();
  // True when the last call to next_batch() returned the final batch of its epoch.
  bool epoch_finished() const { return position_ == 0 && started_; }
  int64_t epochs_completed() const { return epochs_completed_; }
  // Position inside the current epoch, in batches (0 at an epoch boundary).
  int64_t batch_index() const { return batch_index_; }
  // The current epoch's sample order (undefined before the first batch of an epoch).
  at::Tensor epoch_order() const { return order_; }
  // Restores a position saved from epoch_order()/batch_index() (for resume); a sharded dataset draws its
  // order again and ignores `order`.
  void restore(const at::Tensor& order, int64_t batch_index, int64_t epochs_completed);
  // Shards the data as torch.utils.data.DistributedSampler(shuffle, seed, drop_last=drop_tail) at
  // set_epoch(epochs_completed) does: the epoch's order is randperm(n) from a CPU generator seeded
  // seed + epoch (0..n-1 without shuffle), padded by wrap-around or cut to a multiple of world, then
  // this rank's [rank::world]. The user's generator is not used. Call before the first batch.
  void set_shard(int64_t world, int64_t rank, int64_t seed, bool drop_tail);
  int64_t shard_samples() const { return length(); }

 private:
  int64_t length() const { return sharded_ ? shard_samples_ : num_samples_; }  // samples this process sees
  int64_t epoch_length() const;  // samples visited per epoch
  at::Tensor shard_order() const;
  bool indexed() const { return shuffle_ || sharded_; }  // batches are gathered through order_
  int64_t begin_batch();            // draws the epoch's order when due; returns the batch's sample count
  void end_batch(int64_t count);
  at::Tensor gather(size_t which, const at::Tensor& index, int64_t start, int64_t count);

  std::vector<at::Tensor> tensors_;
  int64_t num_samples_;
  int64_t batch_size_;
  bool shuffle_;
  bool drop_last_;
  std::optional<at::Generator> generator_;
  bool reuse_buffers_;
  bool sharded_ = false;
  int64_t world_ = 1;
  int64_t rank_ = 0;
  int64_t seed_ = 0;
  int64_t shard_samples_ = 0;

  at::Tensor order_;  // permutation of the current epoch when shuffling
  at::Tensor sequence_;  // 0..n-1 on the device, the indices when not shuffling (made on first use)
  int64_t position_ = 0;
  int64_t batch_index_ = 0;
  int64_t epochs_completed_ = 0;
  bool started_ = false;
  // Static gather destinations, one set for the full batch and one for the smaller last batch.
  std::vector<at::Tensor> full_buffers_;
  std::vector<at::Tensor> tail_buffers_;
};

}  // namespace hotloop
