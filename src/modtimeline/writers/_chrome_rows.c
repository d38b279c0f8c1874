/* Chrome trace span rows, formatted straight from the span columns.
 *
 * The optional compiled half of writers/chrome.py (which keeps a pure-Python path
 * for machines without a compiler): one C loop writes every "ph":"X" event of a chunk,
 * with times as exact integer microseconds and three decimals (ns / 1000), so no
 * float ever rounds a nanosecond. Names come already JSON-escaped (one bytes object per
 * name index), categories as plain bytes: no Python runs per row.
 */
#include "_columns.h"

/* Callers reserve space first; these only copy. */
static void put(Output *out, const char *text, size_t length) {
    memcpy(out->data + out->size, text, length);
    out->size += length;
}

static void put_int(Output *out, int64_t value) {
    char digits[24];
    int n = 0;
    uint64_t magnitude = value < 0 ? (uint64_t)(-(value + 1)) + 1 : (uint64_t)value;
    if (value < 0) out->data[out->size++] = '-';
    do {
        digits[n++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    while (n) out->data[out->size++] = digits[--n];
}

/* nanoseconds as microseconds with three decimals: 1234567 -> 1234.567 */
static void put_micros(Output *out, int64_t ns) {
    if (ns < 0) {
        out->data[out->size++] = '-';
        ns = -ns;
    }
    put_int(out, ns / 1000);
    int64_t fraction = ns % 1000;
    out->data[out->size++] = '.';
    out->data[out->size++] = (char)('0' + fraction / 100);
    out->data[out->size++] = (char)('0' + fraction / 10 % 10);
    out->data[out->size++] = (char)('0' + fraction % 10);
}

#define LITERAL(out, text) put(out, text, sizeof(text) - 1)


/* The bytes at `index` of list `list` (a name or a category), or NULL with an error. */
static PyObject *item_bytes(PyObject *list, int64_t index, const char *what) {
    if (index < 0 || index >= PyList_GET_SIZE(list)) {
        PyErr_Format(PyExc_ValueError, "%s index %lld out of range", what, (long long)index);
        return NULL;
    }
    PyObject *item = PyList_GET_ITEM(list, index);
    if (!PyBytes_Check(item)) {
        PyErr_Format(PyExc_TypeError, "%s %lld must be bytes", what, (long long)index);
        return NULL;
    }
    return item;
}

static PyObject *format_spans(PyObject *module, PyObject *args) {
    PyObject *track_o, *name_o, *category_o, *begin_o, *end_o, *step_o, *call_o, *flags_o, *flow_o, *lag_o;
    PyObject *names_json, *categories;
    long long base, flow_base, pid;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOLLLO!O!", &track_o, &name_o, &category_o, &begin_o, &end_o, &step_o,
                          &call_o, &flags_o, &flow_o, &lag_o, &base, &flow_base, &pid, &PyList_Type, &names_json,
                          &PyList_Type, &categories))
        return NULL;
    Py_ssize_t rows = PyObject_Length(begin_o);
    if (rows < 0) return NULL;

    Py_buffer v[10];
    PyObject *objects[10] = {track_o, name_o, category_o, begin_o, end_o, step_o, call_o, flags_o, flow_o, lag_o};
    const char *formats[10] = {"q", "q", "b", "q", "q", "q", "q", "b", "b", "q"};
    const char *names[10] = {"track", "name", "category", "begin", "end", "step", "call", "flags", "flow", "lag"};
    int got = 0;
    for (; got < 10; got++)
        if (get_column(objects[got], &v[got], formats[got], rows, names[got]) < 0) goto fail_views;

    const int64_t *track = v[0].buf, *name = v[1].buf, *begin = v[3].buf, *end = v[4].buf, *step = v[5].buf;
    const int64_t *call = v[6].buf, *lag = v[9].buf;
    const int8_t *category = v[2].buf, *flags = v[7].buf, *flow = v[8].buf;

    Output out = {NULL, 0, 0};
    for (Py_ssize_t i = 0; i < rows; i++) {
        PyObject *name_json = item_bytes(names_json, name[i], "name");
        PyObject *category_text = name_json ? item_bytes(categories, category[i], "category") : NULL;
        if (category_text == NULL) goto fail;
        size_t name_length = (size_t)PyBytes_GET_SIZE(name_json), category_length = (size_t)PyBytes_GET_SIZE(category_text);
        /* the name and category + 8 numbers of at most 22 characters + the fixed text around them */
        if (output_reserve(&out, name_length + category_length + 8 * 24 + 200) < 0) goto fail;
        if (i) LITERAL(&out, ",\n");
        /* (the same text as chrome._head) */
        LITERAL(&out, "{\"ph\":\"X\",\"pid\":");
        put_int(&out, pid);
        LITERAL(&out, ",\"tid\":");
        put_int(&out, track[i]);
        LITERAL(&out, ",\"name\":");
        put(&out, PyBytes_AS_STRING(name_json), name_length);
        LITERAL(&out, ",\"cat\":\"");
        put(&out, PyBytes_AS_STRING(category_text), category_length);
        LITERAL(&out, "\",\"ts\":");
        put_micros(&out, begin[i] - base);
        LITERAL(&out, ",\"dur\":");
        put_micros(&out, end[i] - begin[i]);
        LITERAL(&out, ",\"args\":{\"step\":");
        put_int(&out, step[i]);
        if (lag[i] != NO_LAG) { /* a CPU span has none */
            LITERAL(&out, ",\"launch_lag_us\":");
            put_micros(&out, lag[i]);
        }
        LITERAL(&out, ",\"call\":");
        put_int(&out, call[i]);
        if (flags[i] & INCOMPLETE) LITERAL(&out, ",\"incomplete\":true");
        if (flags[i] & APPROXIMATE) LITERAL(&out, ",\"approximate\":true");
        if (flags[i] & COMPILED) LITERAL(&out, ",\"compiled\":true");
        if (flags[i] & FUSED) LITERAL(&out, ",\"fused\":true");
        LITERAL(&out, "}");
        if (flow[i] == FLOW_OUT || flow[i] == FLOW_IN) {
            LITERAL(&out, ",\"bind_id\":");
            put_int(&out, call[i] + flow_base);
            if (flow[i] == FLOW_OUT)
                LITERAL(&out, ",\"flow_out\":true");
            else
                LITERAL(&out, ",\"flow_in\":true");
        }
        LITERAL(&out, "}");
    }
    PyObject *result = PyBytes_FromStringAndSize(out.data ? out.data : "", (Py_ssize_t)out.size);
    PyMem_Free(out.data);
    for (int k = 0; k < 10; k++) PyBuffer_Release(&v[k]);
    return result;

fail:
    PyMem_Free(out.data);
fail_views:
    for (int k = 0; k < got; k++) PyBuffer_Release(&v[k]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"format_spans", format_spans, METH_VARARGS,
     "format_spans(track, name, category, begin, end, step, call, flags, flow, lag, base, flow_base, pid, names_json, "
     "categories) -> bytes\n\n"
     "Chrome 'X' events for every row of the span columns, joined by ',\\n'; flow ids are call + flow_base."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_chrome_rows", NULL, -1, methods};

/* Bumped when format_spans's arguments change: chrome.py refuses a stale build. */
#define API_VERSION 3

PyMODINIT_FUNC PyInit__chrome_rows(void) { return module_with_api(&definition, API_VERSION); }
