// A recorded sequence of dispatcher calls, replayed from C++ (fqvit_det.integer.replay builds it).
//
// At batch 1 the integer ViT's kernels take about half of an eager forward; the rest is Python
// running the modules' forward code between them. The ops and their arguments are the same on
// every call with the same input shape, so the Python side records them once (op, arguments with
// tensors as slot numbers) and this class calls them again through the dispatcher's boxed path:
// the same kernels with the same arguments, hence the same bits. Python decisions taken on tensor
// values (item, is_nonzero, ...) are kept as guards: a different value on replay stops the run and
// the caller runs the eager forward instead.
#include <ATen/ATen.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace {

enum class ArgKind : int64_t { kValue = 0, kSlot = 1, kSlotList = 2, kOptSlotList = 3 };

struct ReplayArg {
  ArgKind kind = ArgKind::kValue;
  c10::IValue value;
  int64_t slot = -1;
  std::vector<int64_t> slots;
};

struct ReplayStep {
  std::optional<c10::OperatorHandle> op;
  std::vector<ReplayArg> args;
  std::vector<int64_t> outs;         // one slot per returned tensor (list elements in order), -1: unused
  std::vector<c10::IValue> expect;   // the recorded value of each non-tensor return (a guard)
  std::vector<int64_t> release;      // slots not read after this step
};

// A tuple payload → the list type the schema asks for (Python passes every list as a tuple).
c10::IValue as_schema_value(const c10::TypePtr& declared, const c10::IValue& v, const std::string& who) {
  if (v.isNone()) return v;
  c10::TypePtr t = declared;
  if (t->kind() == c10::TypeKind::OptionalType) t = t->expectRef<c10::OptionalType>().getElementType();
  if (t->kind() == c10::TypeKind::TensorType) {
    // a Python number where the schema has a Tensor: wrapped as the Python binding wraps it
    // (a 0-dim "wrapped number", which type promotion treats like the scalar)
    TORCH_CHECK(v.isInt() || v.isDouble() || v.isBool(), who, ": a number for a tensor argument");
    at::Tensor w = c10::scalar_to_tensor(v.toScalar());
    w.unsafeGetTensorImpl()->set_wrapped_number(true);
    return w;
  }
  if (t->kind() == c10::TypeKind::DeviceObjType) {
    TORCH_CHECK(v.isString(), who, ": a device is passed as its string");
    return c10::IValue(c10::Device(v.toStringRef()));
  }
  if (t->kind() != c10::TypeKind::ListType) return v;
  TORCH_CHECK(v.isTuple(), who, ": a list argument is passed as a tuple");
  const auto elem = t->expectRef<c10::ListType>().getElementType()->kind();
  const auto& items = v.toTupleRef().elements();
  if (elem == c10::TypeKind::IntType || elem == c10::TypeKind::SymIntType) {
    c10::List<int64_t> out;
    for (const auto& e : items) out.push_back(e.toInt());
    return out;
  }
  if (elem == c10::TypeKind::FloatType) {
    c10::List<double> out;
    for (const auto& e : items) out.push_back(e.toDouble());
    return out;
  }
  if (elem == c10::TypeKind::BoolType) {
    c10::List<bool> out;
    for (const auto& e : items) out.push_back(e.toBool());
    return out;
  }
  TORCH_CHECK(false, who, ": unsupported list argument type ", t->str());
}

bool same_value(const c10::IValue& a, const c10::IValue& b) {
  if (a.isBool() && b.isBool()) return a.toBool() == b.toBool();
  if (a.isInt() && b.isInt()) return a.toInt() == b.toInt();
  if (a.isDouble() && b.isDouble()) return a.toDouble() == b.toDouble();   // NaN: never equal
  if (a.isNone() && b.isNone()) return true;
  return false;
}

class ReplayProgram : public torch::CustomClassHolder {
 public:
  void set_slots(int64_t n) {
    TORCH_CHECK(n >= 0, "ReplayProgram.set_slots: n >= 0");
    base_.assign(n, at::Tensor());
  }

  void set_const(int64_t slot, at::Tensor t) { base_.at(slot) = std::move(t); }

  // args: one (kind, payload) tuple per schema argument, in schema order
  void add_step(std::string name, std::string overload, c10::IValue args,
                std::vector<int64_t> outs, c10::IValue expect, std::vector<int64_t> release) {
    const std::string who = "ReplayProgram.add_step(" + name + "." + overload + ")";
    ReplayStep st;
    st.op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto& schema = st.op->schema();
    TORCH_CHECK(args.isTuple(), who, ": args is a tuple");
    const auto& items = args.toTupleRef().elements();
    TORCH_CHECK(items.size() == schema.arguments().size(), who, ": ", schema.arguments().size(),
                " arguments expected, got ", items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      const auto& pair = items[i].toTupleRef().elements();
      TORCH_CHECK(pair.size() == 2, who, ": each argument is (kind, payload)");
      ReplayArg a;
      a.kind = static_cast<ArgKind>(pair[0].toInt());
      switch (a.kind) {
        case ArgKind::kValue:
          a.value = as_schema_value(schema.arguments()[i].type(), pair[1], who);
          break;
        case ArgKind::kSlot:
          a.slot = check_slot(pair[1].toInt(), who);
          break;
        case ArgKind::kSlotList:
        case ArgKind::kOptSlotList:
          for (const auto& e : pair[1].toTupleRef().elements()) {
            const int64_t s = e.toInt();
            a.slots.push_back(s < 0 && a.kind == ArgKind::kOptSlotList ? -1 : check_slot(s, who));
          }
          break;
        default:
          TORCH_CHECK(false, who, ": unknown argument kind ", pair[0].toInt());
      }
      st.args.push_back(std::move(a));
    }
    for (int64_t s : outs) st.outs.push_back(s < 0 ? -1 : check_slot(s, who));
    if (!expect.isNone())
      for (const auto& e : expect.toTupleRef().elements()) st.expect.push_back(e);
    for (int64_t s : release) st.release.push_back(check_slot(s, who));
    steps_.push_back(std::move(st));
  }

  int64_t num_steps() const { return static_cast<int64_t>(steps_.size()); }
  // the step whose guard stopped the latest run that stopped (-1: none has)
  int64_t failed_step() const { return failed_step_; }

  // The outputs' tensors, or an empty list where a guard differs from the recorded value; the
  // inputs take slots 0, 1, … in order (the recorder numbers them first).
  std::vector<at::Tensor> run(std::vector<at::Tensor> inputs, std::vector<int64_t> out_slots) {
    return execute(std::move(inputs), out_slots, nullptr);
  }

  // Seconds each step took in one run (for per-op profiles without profiler overhead).
  std::vector<double> step_seconds(std::vector<at::Tensor> inputs) {
    std::vector<double> sec(steps_.size(), 0.0);
    execute(std::move(inputs), {}, &sec);
    return sec;
  }

 private:
  std::vector<at::Tensor> execute(std::vector<at::Tensor> inputs, const std::vector<int64_t>& out_slots,
                                  std::vector<double>* sec) {
    TORCH_CHECK(inputs.size() <= base_.size(), "ReplayProgram.run: more inputs than slots");
    std::vector<at::Tensor> slots = base_;
    for (size_t i = 0; i < inputs.size(); ++i) slots[i] = std::move(inputs[i]);
    torch::jit::Stack stack;
    for (size_t i = 0; i < steps_.size(); ++i) {
      const auto& st = steps_[i];
      stack.clear();
      stack.reserve(st.args.size());
      for (const auto& a : st.args) {
        switch (a.kind) {
          case ArgKind::kValue: stack.emplace_back(a.value); break;
          case ArgKind::kSlot: stack.emplace_back(slots[a.slot]); break;
          case ArgKind::kSlotList: {
            c10::List<at::Tensor> l;
            l.reserve(a.slots.size());
            for (int64_t s : a.slots) l.push_back(slots[s]);
            stack.emplace_back(std::move(l));
            break;
          }
          case ArgKind::kOptSlotList: {
            c10::List<std::optional<at::Tensor>> l;
            for (int64_t s : a.slots)
              l.push_back(s < 0 ? std::optional<at::Tensor>() : std::optional<at::Tensor>(slots[s]));
            stack.emplace_back(std::move(l));
            break;
          }
        }
      }
      const auto t0 = sec ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
      st.op->callBoxed(&stack);
      if (sec) (*sec)[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      size_t o = 0, g = 0;
      for (auto& r : stack) {
        if (r.isTensor()) {
          TORCH_CHECK(o < st.outs.size(), "ReplayProgram.run: more tensor returns than recorded");
          if (st.outs[o] >= 0) slots[st.outs[o]] = std::move(r).toTensor();
          ++o;
        } else if (r.isTensorList()) {
          for (const auto& t : r.toTensorVector()) {
            TORCH_CHECK(o < st.outs.size(), "ReplayProgram.run: more tensor returns than recorded");
            if (st.outs[o] >= 0) slots[st.outs[o]] = t;
            ++o;
          }
        } else if (!r.isNone()) {
          TORCH_CHECK(g < st.expect.size(), "ReplayProgram.run: a return without a recorded value");
          if (!same_value(r, st.expect[g])) {
            failed_step_ = static_cast<int64_t>(i);
            return {};
          }
          ++g;
        }
      }
      TORCH_CHECK(o == st.outs.size(), "ReplayProgram.run: fewer tensor returns than recorded");
      for (int64_t s : st.release) slots[s] = at::Tensor();
    }
    std::vector<at::Tensor> out;
    out.reserve(out_slots.size());
    for (int64_t s : out_slots) out.push_back(slots.at(s));
    return out;
  }

  int64_t check_slot(int64_t s, const std::string& who) const {
    TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(base_.size()), who, ": slot ", s,
                " outside [0, ", base_.size(), ")");
    return s;
  }

  std::vector<at::Tensor> base_;     // constants in their slots, undefined elsewhere
  std::vector<ReplayStep> steps_;
  int64_t failed_step_ = -1;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fqvit_int, m) {
  m.class_<ReplayProgram>("ReplayProgram")
      .def(torch::init<>())
      .def("set_slots", &ReplayProgram::set_slots)
      .def("set_const", &ReplayProgram::set_const)
      .def("add_step", &ReplayProgram::add_step)
      .def("num_steps", &ReplayProgram::num_steps)
      .def("failed_step", &ReplayProgram::failed_step)
      .def("run", &ReplayProgram::run)
      .def("step_seconds", &ReplayProgram::step_seconds);
}
