// A 2D convolution (NHWC activations, HWIO kernel, groups) and its two gradients as XLA FFI
// handlers that run oneDNN's primitives, for XLA:CPU (rethink_jax/ops/onednn.py builds and
// registers them; xla_cpu.conv2d_reference is the form they are tested against).
//
// Layouts, all row-major: x (N, H, W, C), kernel (KH, KW, C / G, O) with output channel
// o = g * (O / G) + o', y (N, OH, OW, O). Attributes: strides, padding (top/left; the
// bottom/right padding follows from the output size), dilation (1 = none) and groups.

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <utility>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

enum class Kind : int64_t { kForward = 0, kInputGradient = 1, kKernelGradient = 2 };

// Everything that fixes a primitive: the kind, the shapes and the attributes.
struct ConvShape {
  int64_t n, h, w, c, oh, ow, o, kh, kw, sh, sw, ph, pw, dh, dw, g;

  std::array<int64_t, 18> Key(Kind kind, int threads) const {
    return {static_cast<int64_t>(kind), threads, n, h, w, c, oh, ow, o, kh, kw, sh, sw, ph, pw, dh,
            dw, g};
  }
  double ForwardFlops() const { return 2.0 * n * oh * ow * o * kh * kw * (c / g); }
  memory::desc Activations() const { return {{n, c, h, w}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Outputs() const { return {{n, o, oh, ow}, memory::data_type::f32, Tag::nhwc}; }
  memory::dims KernelDims() const { return {g, o / g, c / g, kh, kw}; }
  // The HWIO kernel as oneDNN's 5D (G, O/G, C/G, KH, KW) weights, described by strides.
  memory::desc Kernel() const {
    memory::dims strides{o / g, 1, o, kw * (c / g) * o, (c / g) * o};
    return {KernelDims(), memory::data_type::f32, strides};
  }
  memory::desc AnyKernel() const { return {KernelDims(), memory::data_type::f32, Tag::any}; }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims Dilates() const { return {dh - 1, dw - 1}; }
  memory::dims PadLeft() const { return {ph, pw}; }
  // The bottom/right padding that makes the output exactly (OH, OW).
  memory::dims PadRight() const {
    return {(oh - 1) * sh + (kh - 1) * dh + 1 - h - ph, (ow - 1) * sw + (kw - 1) * dw + 1 - w - pw};
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Scratch memory comes from the caller (Scratch below): with oneDNN's own, which is shared by
// all primitives, a primitive may only run on the thread that built it, and XLA runs custom
// calls on any of its threads, several at a time.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const ConvShape& s) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      s.Activations(), s.AnyKernel(), s.Outputs(), s.Strides(), s.Dilates(), s.PadLeft(),
      s.PadRight(), UserScratchpad());
}

// A primitive, the kernel layout it wants and the reorder to and from the caller's layout (none
// when they are the same); built once per shape, as oneDNN generates code for each.
struct Prepared {
  dnnl::primitive primitive;
  memory::desc kernel;
  std::optional<dnnl::reorder> reorder;  // to that layout (forward, input gradient) or back
  size_t scratch_bytes = 0;              // the most that the primitive or the reorder needs
};

Prepared WithReorder(Kind kind, const ConvShape& s, dnnl::primitive primitive,
                     const memory::desc& scratchpad, const memory::desc& kernel) {
  Prepared prepared{std::move(primitive), kernel, std::nullopt, scratchpad.get_size()};
  if (kernel != s.Kernel()) {
    auto reorder_pd = kind == Kind::kKernelGradient
                          ? dnnl::reorder::primitive_desc(Engine(), kernel, Engine(), s.Kernel(),
                                                          UserScratchpad())
                          : dnnl::reorder::primitive_desc(Engine(), s.Kernel(), Engine(), kernel,
                                                          UserScratchpad());
    prepared.reorder = dnnl::reorder(reorder_pd);
    prepared.scratch_bytes = std::max(prepared.scratch_bytes, reorder_pd.scratchpad_desc().get_size());
  }
  return prepared;
}

Prepared Prepare(Kind kind, const ConvShape& s) {
  switch (kind) {
    case Kind::kForward: {
      auto pd = ForwardDesc(s);
      return WithReorder(kind, s, dnnl::convolution_forward(pd), pd.scratchpad_desc(),
                         pd.weights_desc());
    }
    case Kind::kInputGradient: {
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, s.Activations(), s.AnyKernel(),
          s.Outputs(), s.Strides(), s.Dilates(), s.PadLeft(), s.PadRight(), ForwardDesc(s),
          UserScratchpad());
      return WithReorder(kind, s, dnnl::convolution_backward_data(pd), pd.scratchpad_desc(),
                         pd.weights_desc());
    }
    case Kind::kKernelGradient: {
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, s.Activations(), s.AnyKernel(),
          s.Outputs(), s.Strides(), s.Dilates(), s.PadLeft(), s.PadRight(), ForwardDesc(s),
          UserScratchpad());
      return WithReorder(kind, s, dnnl::convolution_backward_weights(pd), pd.scratchpad_desc(),
                         pd.diff_weights_desc());
    }
  }
  throw dnnl::error(dnnl_invalid_arguments, "unknown convolution kind");
}

// This thread's scratch memory, grown to the largest request so far.
void* Scratch(size_t bytes) {
  thread_local std::unique_ptr<void, decltype(&std::free)> buffer(nullptr, &std::free);
  thread_local size_t capacity = 0;
  if (bytes > capacity) {
    capacity = (bytes + 63) / 64 * 64;
    buffer.reset(std::aligned_alloc(64, capacity));
    if (!buffer) throw std::bad_alloc();
  }
  return buffer.get();
}

// Below this many FLOPs a conv runs on the calling thread: waking OpenMP's other threads costs
// more (~0.1 ms a call) than they save.
constexpr double kMinFlopsForThreads = 5e7;

// Sets the calling thread's OpenMP thread count for one conv and restores it after (the runtime
// may be shared with other libraries in the process, torch's for one). oneDNN fixes a
// primitive's work split when it builds it, so the count is also part of the cache key.
class ThreadsForConv {
 public:
  explicit ThreadsForConv(const ConvShape& s) : previous_(omp_get_max_threads()) {
    threads_ = s.ForwardFlops() < kMinFlopsForThreads ? 1 : previous_;
    omp_set_num_threads(threads_);
  }
  ~ThreadsForConv() { omp_set_num_threads(previous_); }
  int threads() const { return threads_; }

 private:
  int previous_, threads_;
};

std::shared_ptr<const Prepared> Cached(Kind kind, const ConvShape& s, int threads) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 18>, std::shared_ptr<const Prepared>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[s.Key(kind, threads)];
  if (!entry) entry = std::make_shared<const Prepared>(Prepare(kind, s));
  return entry;
}

ffi::Error Run(Kind kind, const ConvShape& s, float* x, float* kernel, float* y) {
  if (s.n == 0 || s.oh == 0 || s.ow == 0) return ffi::Error::Success();
  if (s.g <= 0 || s.c % s.g != 0 || s.o % s.g != 0) {
    return ffi::Error::InvalidArgument("onednn_conv: channels " + std::to_string(s.c) + " -> " +
                                       std::to_string(s.o) + " do not split into " +
                                       std::to_string(s.g) + " groups");
  }
  try {
    ThreadsForConv threads(s);
    auto prepared = Cached(kind, s, threads.threads());
    thread_local dnnl::stream stream(Engine());
    memory x_mem(s.Activations(), Engine(), x);
    memory y_mem(s.Outputs(), Engine(), y);
    memory user_kernel(s.Kernel(), Engine(), kernel);
    memory kernel_mem = prepared->reorder ? memory(prepared->kernel, Engine()) : user_kernel;
    memory scratch(memory::desc({static_cast<int64_t>(prepared->scratch_bytes)},
                                memory::data_type::u8, Tag::a),
                   Engine(), Scratch(prepared->scratch_bytes));
    auto reorder = [&](memory& from, memory& to) {
      prepared->reorder->execute(
          stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, scratch}});
    };
    switch (kind) {
      case Kind::kForward:
        if (prepared->reorder) reorder(user_kernel, kernel_mem);
        prepared->primitive.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                             {DNNL_ARG_WEIGHTS, kernel_mem},
                                             {DNNL_ARG_DST, y_mem},
                                             {DNNL_ARG_SCRATCHPAD, scratch}});
        break;
      case Kind::kInputGradient:
        if (prepared->reorder) reorder(user_kernel, kernel_mem);
        prepared->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, x_mem},
                                             {DNNL_ARG_WEIGHTS, kernel_mem},
                                             {DNNL_ARG_DIFF_DST, y_mem},
                                             {DNNL_ARG_SCRATCHPAD, scratch}});
        break;
      case Kind::kKernelGradient:
        prepared->primitive.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                             {DNNL_ARG_DIFF_WEIGHTS, kernel_mem},
                                             {DNNL_ARG_DIFF_DST, y_mem},
                                             {DNNL_ARG_SCRATCHPAD, scratch}});
        if (prepared->reorder) reorder(kernel_mem, user_kernel);
        break;
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ConvShape Shape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                int64_t dh, int64_t dw, int64_t g) {
  return {x[0], x[1], x[2], x[3], y[1], y[2], y[3], kernel[0], kernel[1], sh, sw, ph, pw, dh, dw, g};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                   int64_t dh, int64_t dw, int64_t g) {
  auto s = Shape(x.dimensions(), kernel.dimensions(), y->dimensions(), sh, sw, ph, pw, dh, dw, g);
  return Run(Kind::kForward, s, x.typed_data(), kernel.typed_data(), y->typed_data());
}

ffi::Error InputGradient(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t ph,
                         int64_t pw, int64_t dh, int64_t dw, int64_t g) {
  auto s = Shape(dx->dimensions(), kernel.dimensions(), dy.dimensions(), sh, sw, ph, pw, dh, dw, g);
  return Run(Kind::kInputGradient, s, dx->typed_data(), kernel.typed_data(), dy.typed_data());
}

ffi::Error KernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dkernel, int64_t sh, int64_t sw, int64_t ph,
                          int64_t pw, int64_t dh, int64_t dw, int64_t g) {
  auto s = Shape(x.dimensions(), dkernel->dimensions(), dy.dimensions(), sh, sw, ph, pw, dh, dw, g);
  return Run(Kind::kKernelGradient, s, x.typed_data(), dkernel->typed_data(), dy.typed_data());
}

// The three handlers' common signature: two float32 buffers in, one out, and the attributes.
auto Signature() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_h")
      .Attr<int64_t>("pad_w")
      .Attr<int64_t>("dilation_h")
      .Attr<int64_t>("dilation_w")
      .Attr<int64_t>("groups");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RethinkConvForward, Forward, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RethinkConvInputGradient, InputGradient, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RethinkConvKernelGradient, KernelGradient, Signature());
