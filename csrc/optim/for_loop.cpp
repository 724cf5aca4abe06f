// ForLoopOptimizer: what the optimizers of for_loop.h share.
#include "optim/for_loop.h"

namespace hotloop {

void ForLoopOptimizer::set_momentum(OptimizerGroup&, double) const {
  TORCH_CHECK(false, "this optimizer has no momentum or beta1 that a scheduler could cycle");
}

}  // namespace hotloop
