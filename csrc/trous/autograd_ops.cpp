// The Autograd kernel of ops that have no derivative (declared in trous/checks_ops.h).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include "trous/checks_ops.h"

namespace trous {

namespace {
bool requires_grad(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor().defined() && v.toTensor().requires_grad();
  if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList().vec()) {
      if (t.defined() && t.requires_grad()) return true;
    }
  }
  return false;
}
}  // namespace

void refuse_grad_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size();
  if (c10::GradMode::is_enabled()) {
    for (size_t i = 0; i < n; ++i) {
      const c10::IValue& v = (*stack)[stack->size() - n + i];
      TORCH_CHECK(!requires_grad(v), "trous.", schema.operator_name().name.substr(7), ": ",
                  schema.arguments()[i].name(), " requires grad, but this op has no derivative; pass ",
                  schema.arguments()[i].name(), ".detach() or run it under torch.no_grad()");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace trous
