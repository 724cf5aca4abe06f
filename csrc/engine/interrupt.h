// How a window that runs without Python is stopped from outside: a poll between steps, and Interrupted.
#pragma once

#include <exception>
#include <functional>

namespace hotloop {

// Thrown when a window stops at a step boundary because an interrupt was requested (the bindings turn it
// into KeyboardInterrupt).
struct Interrupted : std::exception {
  const char* what() const noexcept override { return "the window was interrupted at a step boundary"; }
};

// Called between two units of work; it may throw to stop the run (the bindings' poll runs Python's signal
// handlers every few milliseconds). An empty PollFn never stops anything.
using PollFn = std::function<void()>;

}  // namespace hotloop
