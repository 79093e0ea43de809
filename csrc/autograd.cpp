// Autograd of the N:M product ops, in C++ so that a call pays no Python on its way to the
// kernel: with the autograd formulas registered from Python (sparsekit/ops.py, which keeps
// them for builds without this extension), every call, even under torch.no_grad(), went
// through a Python trampoline of a few microseconds, as much as a small layer's kernel.
//
// The three ops are linear in each tensor argument, and each one's gradients are the other
// two ops (the same formulas as ops.py):
//   y  = nm_linear(x, V, b)           dx = grad_input(g, V)      dV = sddmm(g, x)   db = sum g
//   gx = nm_linear_grad_input(gy, V)  dgy = nm_linear(g, V)      dV = sddmm(gy, g)
//   gV = nm_sddmm(gy, x)              dgy = nm_linear(x, g)      dx = grad_input(gy, g)
// Backward calls the ops through the dispatcher, so double backward works and each device
// runs its own kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace sparsekit {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

Tensor call_nm_linear(const Tensor& x, const Tensor& values, const Tensor& metadata,
                      const std::optional<Tensor>& bias, int64_t k, int64_t n, int64_t m) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsekit::nm_linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                     const std::optional<Tensor>&, int64_t, int64_t, int64_t)>();
  return op.call(x, values, metadata, bias, k, n, m);
}

Tensor call_grad_input(const Tensor& grad_out, const Tensor& values, const Tensor& metadata,
                       int64_t k, int64_t n, int64_t m) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsekit::nm_linear_grad_input", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t,
                                     int64_t, int64_t)>();
  return op.call(grad_out, values, metadata, k, n, m);
}

Tensor call_sddmm(const Tensor& grad_out, const Tensor& x, const Tensor& metadata, int64_t k,
                  int64_t n, int64_t m) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsekit::nm_sddmm", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t,
                                     int64_t, int64_t)>();
  return op.call(grad_out, x, metadata, k, n, m);
}

void save_pattern(AutogradContext* ctx, int64_t k, int64_t n, int64_t m) {
  ctx->saved_data["k"] = k;
  ctx->saved_data["n"] = n;
  ctx->saved_data["m"] = m;
}

struct Pattern {
  int64_t k, n, m;
  explicit Pattern(AutogradContext* ctx)
      : k(ctx->saved_data["k"].toInt()),
        n(ctx->saved_data["n"].toInt()),
        m(ctx->saved_data["m"].toInt()) {}
};

class NMLinear : public torch::autograd::Function<NMLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values,
                        const Tensor& metadata, const std::optional<Tensor>& bias, int64_t k,
                        int64_t n, int64_t m) {
    ctx->save_for_backward({x, values, metadata});
    save_pattern(ctx, k, n, m);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView below;
    return call_nm_linear(x, values, metadata, bias, k, n, m);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Gradients reach x, the kept values and the bias only: pruned weights have no slot.
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1], &metadata = saved[2];
    const Pattern p(ctx);
    const Tensor g = grads[0].contiguous();
    Tensor dx, dvalues, dbias;
    if (ctx->needs_input_grad(0)) dx = call_grad_input(g, values, metadata, p.k, p.n, p.m);
    if (ctx->needs_input_grad(1)) dvalues = call_sddmm(g, x, metadata, p.k, p.n, p.m);
    // The bias is the fourth differentiable input only when it was given.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      // Summed over every leading dim (a reshape to {-1, rows} fails when rows = 0).
      std::vector<int64_t> lead(g.dim() - 1);
      for (int64_t d = 0; d + 1 < g.dim(); ++d) lead[d] = d;
      dbias = lead.empty() ? g.clone() : g.sum(lead);
    }
    return {dx, dvalues, Tensor(), dbias, Tensor(), Tensor(), Tensor()};
  }
};

class NMLinearGradInput : public torch::autograd::Function<NMLinearGradInput> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& values,
                        const Tensor& metadata, int64_t k, int64_t n, int64_t m) {
    ctx->save_for_backward({grad_out, values, metadata});
    save_pattern(ctx, k, n, m);
    at::AutoDispatchBelowADInplaceOrView below;
    return call_grad_input(grad_out, values, metadata, k, n, m);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &grad_out = saved[0], &values = saved[1], &metadata = saved[2];
    const Pattern p(ctx);
    const Tensor& g = grads[0];
    Tensor dgrad_out, dvalues;
    if (ctx->needs_input_grad(0)) {
      dgrad_out = call_nm_linear(g, values, metadata, std::nullopt, p.k, p.n, p.m);
    }
    if (ctx->needs_input_grad(1)) dvalues = call_sddmm(grad_out, g, metadata, p.k, p.n, p.m);
    return {dgrad_out, dvalues, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class NMSddmm : public torch::autograd::Function<NMSddmm> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& x,
                        const Tensor& metadata, int64_t k, int64_t n, int64_t m) {
    ctx->save_for_backward({grad_out, x, metadata});
    save_pattern(ctx, k, n, m);
    at::AutoDispatchBelowADInplaceOrView below;
    return call_sddmm(grad_out, x, metadata, k, n, m);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // out[r, j] = sum_b grad_out[b, r] x[b, col(r, j)]; with G the dense form of g:
    // d/dgrad_out = x @ G^T, d/dx = grad_out @ G.
    const auto saved = ctx->get_saved_variables();
    const Tensor &grad_out = saved[0], &x = saved[1], &metadata = saved[2];
    const Pattern p(ctx);
    const Tensor& g = grads[0];
    Tensor dgrad_out, dx;
    if (ctx->needs_input_grad(0)) {
      dgrad_out = call_nm_linear(x, g, metadata, std::nullopt, p.k, p.n, p.m);
    }
    if (ctx->needs_input_grad(1)) dx = call_grad_input(grad_out, g, metadata, p.k, p.n, p.m);
    return {dgrad_out, dx, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Whether a call records a graph; when it does not (inference, torch.no_grad()), the op
// goes straight to its kernel without building an autograd node.
bool records(const Tensor& a, const Tensor& b, const std::optional<Tensor>& c = std::nullopt) {
  return at::GradMode::is_enabled() &&
         (a.requires_grad() || b.requires_grad() ||
          (c.has_value() && c->defined() && c->requires_grad()));
}

Tensor nm_linear_autograd(const Tensor& x, const Tensor& values, const Tensor& metadata,
                          const std::optional<Tensor>& bias, int64_t k, int64_t n, int64_t m) {
  if (records(x, values, bias)) return NMLinear::apply(x, values, metadata, bias, k, n, m);
  at::AutoDispatchBelowADInplaceOrView below;
  return call_nm_linear(x, values, metadata, bias, k, n, m);
}

Tensor nm_linear_grad_input_autograd(const Tensor& grad_out, const Tensor& values,
                                     const Tensor& metadata, int64_t k, int64_t n, int64_t m) {
  if (records(grad_out, values)) {
    return NMLinearGradInput::apply(grad_out, values, metadata, k, n, m);
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return call_grad_input(grad_out, values, metadata, k, n, m);
}

Tensor nm_sddmm_autograd(const Tensor& grad_out, const Tensor& x, const Tensor& metadata,
                         int64_t k, int64_t n, int64_t m) {
  if (records(grad_out, x)) return NMSddmm::apply(grad_out, x, metadata, k, n, m);
  at::AutoDispatchBelowADInplaceOrView below;
  return call_sddmm(grad_out, x, metadata, k, n, m);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, Autograd, lib) {
  lib.impl("nm_linear", &nm_linear_autograd);
  lib.impl("nm_linear_grad_input", &nm_linear_grad_input_autograd);
  lib.impl("nm_sddmm", &nm_sddmm_autograd);
}

}  // namespace sparsekit
