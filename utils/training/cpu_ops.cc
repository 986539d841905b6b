// cpu_conv2d, a Paddle custom op built and loaded by utils/training/cpu_ops.py: 2-D convolution + bias of
// float32 NCHW tensors through oneDNN's direct convolution (forward, backward data, backward
// weights and bias), on Paddle's own libdnnl.so.3.
//
// Paddle's libdnnl.so.3 is built without oneDNN's experimental sparse API; with it on, dnnl.hpp
// calls dnnl_memory_create_v2, which that library lacks. The config header's include guard keeps
// the macro off for the headers included after it.
#include <oneapi/dnnl/dnnl_config.h>
#undef DNNL_EXPERIMENTAL_SPARSE
#include <oneapi/dnnl/dnnl.hpp>

#include <vector>

#include "paddle/extension.h"

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

struct Geometry {
  memory::dims src, weights, bias, dst, strides, padding_l, padding_r, dilates;
};

Geometry geometry(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const std::vector<int>& strides,
                  const std::vector<int>& paddings, const std::vector<int>& dilations) {
  Geometry g;
  g.src = {x[0], x[1], x[2], x[3]};
  g.weights = {w[0], w[1], w[2], w[3]};
  g.bias = {w[0]};
  int64_t oh = (x[2] + 2 * paddings[0] - dilations[0] * (w[2] - 1) - 1) / strides[0] + 1;
  int64_t ow = (x[3] + 2 * paddings[1] - dilations[1] * (w[3] - 1) - 1) / strides[1] + 1;
  g.dst = {x[0], w[0], oh, ow};
  g.strides = {strides[0], strides[1]};
  g.padding_l = {paddings[0], paddings[1]};
  // The right padding that makes oneDNN's output size the floor division's above.
  g.padding_r = {(oh - 1) * strides[0] + dilations[0] * (w[2] - 1) + 1 - x[2] - paddings[0],
                 (ow - 1) * strides[1] + dilations[1] * (w[3] - 1) + 1 - x[3] - paddings[1]};
  g.dilates = {dilations[0] - 1, dilations[1] - 1};  // oneDNN counts the gaps between taps
  return g;
}

// Layout left to oneDNN: it picks the blocked layouts its fastest kernels read.
memory::desc any_desc(const memory::dims& d) { return memory::desc(d, dt::f32, tag::any); }

memory plain(const memory::dims& d, const paddle::Tensor& t) {
  return memory(memory::desc(d, dt::f32, d.size() == 1 ? tag::a : tag::abcd), cpu_engine(),
                const_cast<float*>(t.data<float>()));
}

// `user` in the layout `want`: itself, or a reordered copy.
memory as_layout(const memory& user, const memory::desc& want, dnnl::stream& s) {
  if (user.get_desc() == want) return user;
  memory out(want, cpu_engine());
  dnnl::reorder(user, out).execute(s, const_cast<memory&>(user), out);
  return out;
}

// Where a primitive writes a result meant for `user`: `user` itself when the layouts agree.
memory result_for(const memory& user, const memory::desc& want) {
  return user.get_desc() == want ? user : memory(want, cpu_engine());
}

void copy_back(const memory& result, const memory& user, dnnl::stream& s) {
  if (result.get_desc() == user.get_desc()) return;
  dnnl::reorder(result, user).execute(s, const_cast<memory&>(result), const_cast<memory&>(user));
}

dnnl::convolution_forward::primitive_desc forward_pd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, any_desc(g.src),
      any_desc(g.weights), memory::desc(g.bias, dt::f32, tag::a), any_desc(g.dst), g.strides, g.dilates,
      g.padding_l, g.padding_r);
}

paddle::Tensor empty_like_shape(const std::vector<int64_t>& shape) {
  return paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
}

void check_inputs(const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& b) {
  PD_CHECK(x.is_cpu() && w.is_cpu() && b.is_cpu(), "cpu_conv2d runs on the CPU only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && w.dtype() == paddle::DataType::FLOAT32 &&
               b.dtype() == paddle::DataType::FLOAT32,
           "cpu_conv2d takes float32 tensors");
  PD_CHECK(x.shape().size() == 4 && w.shape().size() == 4 && x.shape()[1] == w.shape()[1] &&
               b.numel() == w.shape()[0],
           "cpu_conv2d takes x [B, C, H, W], weight [O, C, kh, kw] and bias [O]");
}

}  // namespace

std::vector<paddle::Tensor> Conv2dForward(const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& b,
                                          const std::vector<int>& strides, const std::vector<int>& paddings,
                                          const std::vector<int>& dilations, bool need_input_grad) {
  check_inputs(x, w, b);
  Geometry g = geometry(x.shape(), w.shape(), strides, paddings, dilations);
  auto out = empty_like_shape({g.dst[0], g.dst[1], g.dst[2], g.dst[3]});
  dnnl::stream s(cpu_engine());
  auto pd = forward_pd(g);
  memory src = as_layout(plain(g.src, x), pd.src_desc(), s);
  memory weights = as_layout(plain(g.weights, w), pd.weights_desc(), s);
  memory user_dst = plain(g.dst, out);
  memory dst = result_for(user_dst, pd.dst_desc());
  dnnl::convolution_forward(pd).execute(
      s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_BIAS, plain(g.bias, b)}, {DNNL_ARG_DST, dst}});
  copy_back(dst, user_dst, s);
  s.wait();
  return {out};
}

std::vector<paddle::Tensor> Conv2dBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                           const paddle::Tensor& b, const paddle::Tensor& grad_out,
                                           const std::vector<int>& strides, const std::vector<int>& paddings,
                                           const std::vector<int>& dilations, bool need_input_grad) {
  Geometry g = geometry(x.shape(), w.shape(), strides, paddings, dilations);
  dnnl::stream s(cpu_engine());
  auto fwd = forward_pd(g);
  memory user_grad_out = plain(g.dst, grad_out);
  // Paddle wants every grad output; the input's is dropped when it needs none, so then it stays unwritten.
  auto grad_x = empty_like_shape(x.shape());
  if (need_input_grad) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        cpu_engine(), dnnl::algorithm::convolution_direct, any_desc(g.src), any_desc(g.weights), any_desc(g.dst),
        g.strides, g.dilates, g.padding_l, g.padding_r, fwd);
    memory dd = as_layout(user_grad_out, pd.diff_dst_desc(), s);
    memory weights = as_layout(plain(g.weights, w), pd.weights_desc(), s);
    memory user_ds = plain(g.src, grad_x);
    memory ds = result_for(user_ds, pd.diff_src_desc());
    dnnl::convolution_backward_data(pd).execute(
        s, {{DNNL_ARG_DIFF_DST, dd}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, ds}});
    copy_back(ds, user_ds, s);
  }
  auto grad_w = empty_like_shape(w.shape());
  auto grad_b = empty_like_shape(b.shape());
  auto pd = dnnl::convolution_backward_weights::primitive_desc(
      cpu_engine(), dnnl::algorithm::convolution_direct, any_desc(g.src), any_desc(g.weights),
      memory::desc(g.bias, dt::f32, tag::a), any_desc(g.dst), g.strides, g.dilates, g.padding_l, g.padding_r, fwd);
  memory src = as_layout(plain(g.src, x), pd.src_desc(), s);
  memory dd = as_layout(user_grad_out, pd.diff_dst_desc(), s);
  memory user_dw = plain(g.weights, grad_w);
  memory dw = result_for(user_dw, pd.diff_weights_desc());
  dnnl::convolution_backward_weights(pd).execute(s, {{DNNL_ARG_SRC, src},
                                                     {DNNL_ARG_DIFF_DST, dd},
                                                     {DNNL_ARG_DIFF_WEIGHTS, dw},
                                                     {DNNL_ARG_DIFF_BIAS, plain(g.bias, grad_b)}});
  copy_back(dw, user_dw, s);
  s.wait();
  return {grad_x, grad_w, grad_b};
}

std::vector<std::vector<int64_t>> Conv2dInferShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                   const std::vector<int64_t>& b, const std::vector<int>& strides,
                                                   const std::vector<int>& paddings,
                                                   const std::vector<int>& dilations, bool need_input_grad) {
  Geometry g = geometry(x, w, strides, paddings, dilations);
  return {{g.dst[0], g.dst[1], g.dst[2], g.dst[3]}};
}

std::vector<paddle::DataType> SameDtype(const paddle::DataType& x, const paddle::DataType&,
                                         const paddle::DataType&) {
  return {x};
}

PD_BUILD_OP(cpu_conv2d)
    .Inputs({"X", "W", "B"})
    .Outputs({"Out"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "dilations: std::vector<int>",
            "need_input_grad: bool"})
    .SetKernelFn(PD_KERNEL(Conv2dForward))
    .SetInferShapeFn(PD_INFER_SHAPE(Conv2dInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));

PD_BUILD_GRAD_OP(cpu_conv2d)
    .Inputs({"X", "W", "B", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W"), paddle::Grad("B")})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "dilations: std::vector<int>",
            "need_input_grad: bool"})
    .SetKernelFn(PD_KERNEL(Conv2dBackward));
