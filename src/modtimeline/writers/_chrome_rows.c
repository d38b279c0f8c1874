/* Chrome trace span rows, formatted straight from the span columns.
 *
 * The optional compiled half of writers/chrome.py (which keeps a pure-Python path
 * for machines without a compiler): one C loop writes every "ph":"X" event of a chunk,
 * with times as exact integer microseconds and three decimals (ns / 1000), so no
 * float ever rounds a nanosecond. The text that repeats per (track, name, category),
 * the event's "head", comes from a Python callback, once per distinct key.
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

enum { FLOW_OUT = 1, FLOW_IN = 2, INCOMPLETE = 1, APPROXIMATE = 2, COMPILED = 4 }; /* format.py */

static PyObject *format_spans(PyObject *module, PyObject *args) {
    PyObject *track_o, *name_o, *category_o, *begin_o, *end_o, *step_o, *call_o, *flags_o, *flow_o, *lag_o;
    PyObject *make_head;
    long long base, flow_base;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOLLO", &track_o, &name_o, &category_o, &begin_o, &end_o, &step_o,
                          &call_o, &flags_o, &flow_o, &lag_o, &base, &flow_base, &make_head))
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

    PyObject *heads = PyDict_New(); /* (track, name, category) packed in one int -> head bytes */
    if (heads == NULL) goto fail_views;
    Output out = {NULL, 0, 0};
    for (Py_ssize_t i = 0; i < rows; i++) {
        PyObject *key = PyLong_FromLongLong(((long long)track[i] << 40) ^ ((long long)name[i] << 8) ^ category[i]);
        if (key == NULL) goto fail;
        PyObject *head = PyDict_GetItemWithError(heads, key); /* borrowed */
        if (head == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(key);
                goto fail;
            }
            head = PyObject_CallFunction(make_head, "LLi", (long long)track[i], (long long)name[i], (int)category[i]);
            if (head == NULL || !PyBytes_Check(head) || PyDict_SetItem(heads, key, head) < 0) {
                if (head != NULL && !PyBytes_Check(head))
                    PyErr_SetString(PyExc_TypeError, "make_head must return bytes");
                Py_XDECREF(head);
                Py_DECREF(key);
                goto fail;
            }
            Py_DECREF(head); /* the dict holds it */
        }
        Py_DECREF(key);
        Py_ssize_t head_length = PyBytes_GET_SIZE(head);
        /* head + 6 numbers of at most 22 characters + the fixed text around them */
        if (output_reserve(&out, (size_t)head_length + 6 * 24 + 160) < 0) goto fail;
        if (i) LITERAL(&out, ",\n");
        put(&out, PyBytes_AS_STRING(head), (size_t)head_length);
        put_micros(&out, begin[i] - base);
        LITERAL(&out, ",\"dur\":");
        put_micros(&out, end[i] - begin[i]);
        LITERAL(&out, ",\"args\":{\"step\":");
        put_int(&out, step[i]);
        if (lag[i] != INT64_MIN) { /* resolve.NO_LAG: a CPU span */
            LITERAL(&out, ",\"launch_lag_us\":");
            put_micros(&out, lag[i]);
        }
        LITERAL(&out, ",\"call\":");
        put_int(&out, call[i]);
        if (flags[i] & INCOMPLETE) LITERAL(&out, ",\"incomplete\":true");
        if (flags[i] & APPROXIMATE) LITERAL(&out, ",\"approximate\":true");
        if (flags[i] & COMPILED) LITERAL(&out, ",\"compiled\":true");
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
    Py_DECREF(heads);
    for (int k = 0; k < 10; k++) PyBuffer_Release(&v[k]);
    return result;

fail:
    PyMem_Free(out.data);
    Py_DECREF(heads);
fail_views:
    for (int k = 0; k < got; k++) PyBuffer_Release(&v[k]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"format_spans", format_spans, METH_VARARGS,
     "format_spans(track, name, category, begin, end, step, call, flags, flow, lag, base, flow_base, make_head) -> bytes\n\n"
     "Chrome 'X' events for every row of the span columns, joined by ',\\n'; flow ids are call + flow_base."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_chrome_rows", NULL, -1, methods};

/* Bumped when format_spans's arguments change: chrome.py refuses a stale build. */
#define API_VERSION 2

PyMODINIT_FUNC PyInit__chrome_rows(void) {
    PyObject *module = PyModule_Create(&definition);
    if (module && PyModule_AddIntConstant(module, "API", API_VERSION) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
