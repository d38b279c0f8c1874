// resolve() for host-only windows, compiled (optional; resolve.py does the same in
// Python, and always where device marks are present). No torch here: plain CPython.
//
//   spans(timestamps, codes, link_node, link_code, close_ns, raised_calls, raised_steps,
//         first_step_name) -> (columns, tracks, step_calls)
//
// columns: bytes of the SpanColumns arrays in resolve.py's order (track, begin, end,
// name, call, step, lag as int64; category, flags, flow as int8); tracks: [(tid, name)];
// step_calls: the step number of each step span, whose names resolve.py appends.
// Every rule (pairing, closing, hull, approximate bounds, lanes, order) is resolve.py's;
// a test checks that both give identical columns. The constants below are exported as
// LAYOUT, and resolve.py refuses this module when they differ from its own.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_layout.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

using namespace modtimeline_layout;  // every constant shared with Python (_layout.h)

// The arguments spans() takes and the columns it returns (spans/resolve.py RESOLVE_API).
constexpr long long RESOLVE_API = 1;


struct Span {
  int64_t begin, end, name;
  int8_t category;
  int64_t call, step;
  int8_t flags;
  int64_t pass = -1;  // a backward span's backward pass
};

struct Columns {
  std::vector<int64_t> track, begin, end, name, call, step, lag;
  std::vector<int8_t> category, flags, flow;
};

// A read-only int64 view of a buffer-protocol object (array('q')).
struct Int64s {
  Py_buffer view{};
  bool ok = false;
  explicit Int64s(PyObject* object) {
    if (PyObject_GetBuffer(object, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return;
    if (view.itemsize != 8 || view.format == nullptr || (strcmp(view.format, "q") != 0 && strcmp(view.format, "l") != 0)) {
      PyErr_SetString(PyExc_TypeError, "expected an array('q')");
      PyBuffer_Release(&view);
      return;
    }
    ok = true;
  }
  ~Int64s() {
    if (ok) PyBuffer_Release(&view);
  }
  Py_ssize_t size() const { return view.len / 8; }
  int64_t operator[](Py_ssize_t i) const { return static_cast<const int64_t*>(view.buf)[i]; }
};

bool contains(PyObject* set, int64_t value, bool* error) {
  if (PySet_GET_SIZE(set) == 0) return false;
  PyObject* key = PyLong_FromLongLong(value);
  if (key == nullptr) {
    *error = true;
    return false;
  }
  int found = PySet_Contains(set, key);
  Py_DECREF(key);
  if (found < 0) *error = true;
  return found == 1;
}

// resolve.assign_lanes: nesting order (begin asc, end desc, call asc, then as listed),
// then the lowest lane whose stack of open ends can take each span.
std::vector<int64_t> assign_lanes(std::vector<Span>& spans) {
  std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end > b.end;
    return a.call < b.call;
  });
  std::vector<std::vector<int64_t>> stacks(1);
  std::vector<int64_t> lanes;
  lanes.reserve(spans.size());
  for (const Span& span : spans) {
    size_t lane = 0;
    for (;; ++lane) {
      if (lane == stacks.size()) stacks.emplace_back();
      auto& stack = stacks[lane];
      while (!stack.empty() && stack.back() <= span.begin) stack.pop_back();
      if (stack.empty() || span.end <= stack.back()) {
        stack.push_back(span.end);
        break;
      }
    }
    lanes.push_back(static_cast<int64_t>(lane));
  }
  return lanes;
}

// resolve._emit_lanes: lane by lane (stable), one track per lane.
bool emit_lanes(Columns& out, PyObject* tracks, std::vector<Span>& spans, int64_t first_tid, const char* label,
                const std::unordered_set<int64_t>& flow_calls) {
  std::vector<int64_t> lanes = assign_lanes(spans);
  int64_t lane_count = lanes.empty() ? 0 : *std::max_element(lanes.begin(), lanes.end()) + 1;
  std::vector<char> used(static_cast<size_t>(lane_count), 0);
  for (int64_t lane : lanes) used[lane] = 1;
  for (int64_t lane = 0; lane < lane_count; ++lane) {
    if (!used[lane]) continue;
    std::string name = lane == 0 ? std::string(label) : std::string(label) + " (" + std::to_string(lane + 1) + ")";
    PyObject* track = Py_BuildValue("(Ls)", static_cast<long long>(first_tid + lane), name.c_str());
    if (track == nullptr || PyList_Append(tracks, track) < 0) {
      Py_XDECREF(track);
      return false;
    }
    Py_DECREF(track);
  }
  std::vector<size_t> order(spans.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return lanes[a] < lanes[b]; });
  static const int8_t flow_by_category[] = {FLOW_OUT, FLOW_IN, FLOW_NONE, FLOW_NONE};
  for (size_t i : order) {
    const Span& s = spans[i];
    out.track.push_back(first_tid + lanes[i]);
    out.begin.push_back(s.begin);
    out.end.push_back(s.end);
    out.name.push_back(s.name);
    out.category.push_back(s.category);
    out.call.push_back(s.call);
    out.step.push_back(s.step);
    out.flags.push_back(s.flags);
    out.flow.push_back(flow_calls.count(s.call) ? flow_by_category[s.category] : FLOW_NONE);
    out.lag.push_back(NO_LAG);
  }
  return true;
}

template <class T>
PyObject* bytes_of(const std::vector<T>& column) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(column.data()),
                                   static_cast<Py_ssize_t>(column.size() * sizeof(T)));
}

PyObject* spans(PyObject*, PyObject* args) {
  PyObject *ts_obj, *codes_obj, *node_obj, *link_obj, *raised_calls, *raised_steps;
  long long close_ns, first_step_name;
  if (!PyArg_ParseTuple(args, "OOOOLO!O!L", &ts_obj, &codes_obj, &node_obj, &link_obj, &close_ns, &PySet_Type,
                        &raised_calls, &PySet_Type, &raised_steps, &first_step_name)) {
    return nullptr;
  }
  Int64s timestamps(ts_obj), codes(codes_obj), link_node(node_obj), link_code(link_obj);
  if (!timestamps.ok || !codes.ok || !link_node.ok || !link_code.ok) return nullptr;
  if (timestamps.size() != codes.size() || link_node.size() != link_code.size()) {
    PyErr_SetString(PyExc_ValueError, "column lengths differ");
    return nullptr;
  }

  // Links grouped by node, each node's in recorded order (a stable counting sort).
  int64_t max_node = -1;
  for (Py_ssize_t i = 0; i < link_node.size(); ++i) max_node = std::max(max_node, link_node[i]);
  std::vector<size_t> first_link(static_cast<size_t>(max_node + 2), 0);
  for (Py_ssize_t i = 0; i < link_node.size(); ++i) {
    if (link_node[i] < 0) {
      PyErr_SetString(PyExc_ValueError, "negative node id");
      return nullptr;
    }
    ++first_link[link_node[i] + 1];
  }
  for (size_t n = 1; n < first_link.size(); ++n) first_link[n] += first_link[n - 1];
  std::vector<int64_t> links(static_cast<size_t>(link_node.size()));
  {
    std::vector<size_t> fill(first_link.begin(), first_link.end() - 1);
    for (Py_ssize_t i = 0; i < link_node.size(); ++i) links[fill[link_node[i]]++] = link_code[i];
  }

  std::vector<Span> all;  // every span made, in creation order
  all.reserve(static_cast<size_t>(codes.size() / 2 + 1));
  std::vector<size_t> forward, backward, steps;
  std::unordered_map<int64_t, size_t> open_fw;  // call -> span
  // Per backward pass (the number node events carry): its open spans by call (a call's
  // backward begins once per pass), and when its latest node event was stamped.
  std::unordered_map<int64_t, std::unordered_map<int64_t, size_t>> open_bw;
  std::vector<int64_t> pass_order;  // open_bw's passes in the order they opened (a dict's)
  std::unordered_map<int64_t, int64_t> last_seen;
  std::unordered_map<int64_t, int64_t> parent_of;
  std::vector<int64_t> fw_stack, rc_stack;
  int64_t open_step = -1;
  int64_t step = -1;
  bool error = false;

  auto open_span = [&](int64_t begin, int64_t name, int8_t category, int64_t call, int64_t span_step) {
    all.push_back({begin, close_ns, name, category, call, span_step, INCOMPLETE});
    return all.size() - 1;
  };
  // What is open, in the order it was opened (a Python dict's order).
  auto in_order = [&](const std::unordered_map<int64_t, size_t>& open) {
    std::vector<size_t> indices;
    indices.reserve(open.size());
    for (const auto& entry : open) indices.push_back(entry.second);
    std::sort(indices.begin(), indices.end());
    return indices;
  };

  // A backward pass is over: close every span it opened (resolve._close_pass).
  auto close_pass = [&](const std::unordered_map<int64_t, size_t>& pass_spans, int64_t done_ns) {
    for (size_t index : in_order(pass_spans)) {
      Span& span = all[index];
      if (span.end < 0) {
        span.end = done_ns;
        span.flags = APPROXIMATE;
      } else {
        span.flags = 0;
      }
      backward.push_back(index);
    }
  };
  // A pass that never finished (resolve._close_unfinished).
  auto close_unfinished = [&](const std::unordered_map<int64_t, size_t>& pass_spans, int64_t bound_ns) {
    for (size_t index : in_order(pass_spans)) {
      Span& span = all[index];
      if (span.end < 0) span.end = std::max(bound_ns, span.begin);
      span.flags = INCOMPLETE;
      backward.push_back(index);
    }
  };
  auto close_all_unfinished = [&](int64_t default_ns) {
    for (int64_t number : pass_order) {
      auto seen = last_seen.find(number);
      close_unfinished(open_bw[number], seen == last_seen.end() ? default_ns : seen->second);
    }
    open_bw.clear();
    pass_order.clear();
    last_seen.clear();
  };

  for (Py_ssize_t i = 0; i < codes.size(); ++i) {
    int64_t ts = timestamps[i], code = codes[i];
    int64_t kind = code & KIND_MASK, call = code >> CALL_SHIFT;
    if (kind == FORWARD_BEGIN || kind == RECOMPUTE_BEGIN) {
      int8_t category = kind == FORWARD_BEGIN ? FORWARD : RECOMPUTE;
      open_fw[call] = open_span(ts, (code >> KIND_BITS) & MODULE_MASK, category, call, step);
      auto& stack = category == FORWARD ? fw_stack : rc_stack;
      if (!stack.empty()) parent_of[call] = stack.back();
      stack.push_back(call);
    } else if (kind == FORWARD_END || kind == RECOMPUTE_END) {
      auto found = open_fw.find(call);
      if (found == open_fw.end()) continue;
      size_t index = found->second;
      open_fw.erase(found);
      Span& span = all[index];
      span.end = ts;
      span.flags = contains(raised_calls, call, &error) ? INCOMPLETE : 0;
      auto& stack = span.category == FORWARD ? fw_stack : rc_stack;
      if (!stack.empty() && stack.back() == call) {
        stack.pop_back();
      } else {
        auto at = std::find(stack.begin(), stack.end(), call);
        if (at != stack.end()) stack.erase(at);
      }
      (span.category == FORWARD ? forward : backward).push_back(index);
    } else if (kind == GRADIENT_READY) {
      // A node is about to run: the calls it begins open (once per backward pass).
      int64_t number = (code >> KIND_BITS) & MODULE_MASK;
      last_seen[number] = ts;
      if (open_bw.count(number) == 0) pass_order.push_back(number);
      auto& pass_spans = open_bw[number];
      if (call < 0 || call > max_node) continue;
      for (size_t l = first_link[call]; l < first_link[call + 1]; ++l) {
        if (!(links[l] & LINK_BEGIN)) continue;
        int64_t linked_call = links[l] >> LINK_SHIFT;
        if (pass_spans.count(linked_call) == 0) {
          size_t index = open_span(ts, (links[l] >> 1) & MODULE_MASK, BACKWARD, linked_call, step);
          all[index].end = -1;
          all[index].pass = number;
          pass_spans[linked_call] = index;
        }
      }
    } else if (kind == NODE_DONE) {
      // A node has run: the latest end so far of the pass's open calls it may end.
      int64_t number = (code >> KIND_BITS) & MODULE_MASK;
      last_seen[number] = ts;
      auto pass = open_bw.find(number);
      if (pass == open_bw.end() || call < 0 || call > max_node) continue;
      for (size_t l = first_link[call]; l < first_link[call + 1]; ++l) {
        if (links[l] & LINK_BEGIN) continue;
        auto found = pass->second.find(links[l] >> LINK_SHIFT);
        if (found != pass->second.end()) all[found->second].end = ts;
      }
    } else if (kind == BACKWARD_DONE) {
      int64_t number = (code >> KIND_BITS) & MODULE_MASK;
      auto pass = open_bw.find(number);
      if (pass != open_bw.end()) {
        close_pass(pass->second, ts);
        open_bw.erase(pass);
        pass_order.erase(std::find(pass_order.begin(), pass_order.end(), number));
      }
      last_seen.erase(number);
    } else if (kind == STEP_BEGIN) {
      step = call;
      open_step = static_cast<int64_t>(open_span(ts, -1, STEP, call, call));
    } else if (kind == STEP_END) {
      // A backward pass runs inside the step that started it: one still open raised.
      close_all_unfinished(ts);
      if (open_step >= 0) {
        all[open_step].end = ts;
        all[open_step].flags = contains(raised_steps, call, &error) ? INCOMPLETE : 0;
        steps.push_back(static_cast<size_t>(open_step));
        open_step = -1;
      }
      step = -1;
    }
    if (error) return nullptr;
  }

  // What never ended (an exception, a backward that never ran) closes at close_ns.
  for (size_t index : in_order(open_fw)) (all[index].category == FORWARD ? forward : backward).push_back(index);
  close_all_unfinished(close_ns);
  if (open_step >= 0) steps.push_back(static_cast<size_t>(open_step));

  std::vector<Span> step_spans, forward_spans, backward_spans;
  PyObject* step_calls = PyList_New(0);
  if (step_calls == nullptr) return nullptr;
  for (size_t index : steps) {
    Span span = all[index];
    span.name = first_step_name + static_cast<int64_t>(step_spans.size());
    step_spans.push_back(span);
    PyObject* number = PyLong_FromLongLong(span.call);
    if (number == nullptr || PyList_Append(step_calls, number) < 0) {
      Py_XDECREF(number);
      Py_DECREF(step_calls);
      return nullptr;
    }
    Py_DECREF(number);
  }
  for (size_t index : forward) forward_spans.push_back(all[index]);
  for (size_t index : backward) backward_spans.push_back(all[index]);

  // Backward spans by (pass, call) (resolve._by_pass_and_call): the rules below relate
  // spans of one pass only.
  struct PairHash {
    size_t operator()(const std::pair<int64_t, int64_t>& p) const {
      return std::hash<int64_t>()(p.first * 1000003 ^ p.second);
    }
  };
  using Key = std::pair<int64_t, int64_t>;
  std::unordered_map<Key, size_t, PairHash> by_key;
  for (size_t i = 0; i < backward_spans.size(); ++i) {
    if (backward_spans[i].category == BACKWARD) by_key[{backward_spans[i].pass, backward_spans[i].call}] = i;
  }

  // resolve._hull_backward: widen each backward span over its module's children's of the
  // same pass (approximate children widen nothing); latest call first.
  std::vector<Key> keys;
  keys.reserve(by_key.size());
  for (const auto& entry : by_key) keys.push_back(entry.first);
  std::sort(keys.begin(), keys.end(), [](const Key& a, const Key& b) {
    return a.second != b.second ? a.second > b.second : a.first > b.first;
  });
  for (const Key& key : keys) {
    if (backward_spans[by_key[key]].flags & APPROXIMATE) continue;
    auto parent = parent_of.find(key.second);
    while (parent != parent_of.end() && by_key.find({key.first, parent->second}) == by_key.end()) {
      parent = parent_of.find(parent->second);
    }
    if (parent == parent_of.end()) continue;
    const Span& child = backward_spans[by_key[key]];
    Span& outer = backward_spans[by_key[{key.first, parent->second}]];
    outer.begin = std::min(outer.begin, child.begin);
    outer.end = std::max(outer.end, child.end);
  }

  // resolve._bound_approximate: an approximate span ends no later than its nearest
  // bounded ancestor of the same pass, and never before it began.
  for (const auto& entry : by_key) {
    Span& span = backward_spans[entry.second];
    if (!(span.flags & APPROXIMATE)) continue;
    auto parent = parent_of.find(span.call);
    while (parent != parent_of.end()) {
      auto outer = by_key.find({entry.first.first, parent->second});
      if (outer != by_key.end() && !(backward_spans[outer->second].flags & APPROXIMATE)) {
        const Span& bound = backward_spans[outer->second];
        if (bound.begin <= span.begin && bound.end < span.end) span.end = std::max(bound.end, span.begin);
        break;
      }
      parent = parent_of.find(parent->second);
    }
  }

  // resolve._spans_from_children: a call none of whose nodes its outputs carry gets, in
  // a pass where its descendants have backward spans and it has none, their hull, flagged
  // approximate.
  {
    std::unordered_map<int64_t, int64_t> module_of;
    for (const Span& s : forward_spans) module_of[s.call] = s.name;
    for (const Span& s : backward_spans) {
      if (s.category == RECOMPUTE) module_of[s.call] = s.name;
    }
    auto key = [](int64_t pass, int64_t call) { return std::make_pair(pass, call); };
    std::unordered_set<std::pair<int64_t, int64_t>, PairHash> real;
    for (const Span& s : backward_spans) {
      if (s.category == BACKWARD) real.insert(key(s.pass, s.call));
    }
    std::unordered_map<std::pair<int64_t, int64_t>, size_t, PairHash> made;
    size_t count = backward_spans.size();
    for (size_t i = 0; i < count; ++i) {
      if (backward_spans[i].category != BACKWARD) continue;
      int64_t number = backward_spans[i].pass;
      auto parent = parent_of.find(backward_spans[i].call);
      while (parent != parent_of.end() && real.count(key(number, parent->second)) == 0 &&
             module_of.count(parent->second)) {
        int64_t ancestor = parent->second;
        const Span child = backward_spans[i];
        auto found = made.find(key(number, ancestor));
        if (found == made.end()) {
          Span hull = child;
          hull.name = module_of[ancestor];
          hull.call = ancestor;
          hull.flags = static_cast<int8_t>(APPROXIMATE | (child.flags & INCOMPLETE));
          made[key(number, ancestor)] = backward_spans.size();
          backward_spans.push_back(hull);
        } else {
          Span& hull = backward_spans[found->second];
          hull.begin = std::min(hull.begin, child.begin);
          hull.end = std::max(hull.end, child.end);
          hull.flags = static_cast<int8_t>(hull.flags | (child.flags & INCOMPLETE));
        }
        parent = parent_of.find(ancestor);
      }
    }
  }

  // Flow arrows join a call's forward span to its backward span.
  std::unordered_set<int64_t> forward_calls, flow_calls;
  for (const Span& s : forward_spans) forward_calls.insert(s.call);
  for (const Span& s : backward_spans) {
    if (s.category == BACKWARD && forward_calls.count(s.call)) flow_calls.insert(s.call);
  }

  Columns out;
  PyObject* tracks = PyList_New(0);
  if (tracks == nullptr) {
    Py_DECREF(step_calls);
    return nullptr;
  }
  std::unordered_set<int64_t> no_flows;
  bool ok = (step_spans.empty() || emit_lanes(out, tracks, step_spans, STEPS_TRACK, "steps", no_flows)) &&
            emit_lanes(out, tracks, forward_spans, FORWARD_TRACK, "forward", flow_calls) &&
            emit_lanes(out, tracks, backward_spans, BACKWARD_TRACK, "backward", flow_calls);
  if (!ok) {
    Py_DECREF(tracks);
    Py_DECREF(step_calls);
    return nullptr;
  }
  PyObject* columns = Py_BuildValue("(NNNNNNNNNN)", bytes_of(out.track), bytes_of(out.begin), bytes_of(out.end),
                                    bytes_of(out.name), bytes_of(out.category), bytes_of(out.call),
                                    bytes_of(out.step), bytes_of(out.flags), bytes_of(out.flow), bytes_of(out.lag));
  if (columns == nullptr) {
    Py_DECREF(tracks);
    Py_DECREF(step_calls);
    return nullptr;
  }
  return Py_BuildValue("(NNN)", columns, tracks, step_calls);
}

PyMethodDef methods[] = {
    {"spans", spans, METH_VARARGS, "host-only resolve: (columns, tracks, step_calls); see resolve.py"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "modtimeline.native._resolve_cpu", "resolve() for host-only windows, compiled", -1, methods,
    nullptr,               nullptr,                     nullptr,                                     nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__resolve_cpu() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  int added = add_layout(module, RESOLVE_API);
  if (added < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
