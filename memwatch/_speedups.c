/* memwatch._speedups: the per-request recording path in C (optional).
 *
 * memwatch's per-request work (which auth scheme a request used, a keyed fingerprint of its
 * credential, one queued record) costs several microseconds when interpreted, more than the
 * whole budget of the always-on tier. This module does the common cases of that work in one
 * call and hands every other case back to the pure-Python reference implementation
 * (memwatch.auth.AuthClassifier, memwatch.sketch.Fingerprinter), so that both paths give the
 * same record for every request (tests/test_speedups.py checks it on generated headers).
 *
 * What is decided here, and only when it is decided exactly as the Python code decides it:
 *   - no Authorization, no API-key header, no configured query parameter and no configured
 *     cookie name anywhere in the query string or the cookies: anonymous;
 *   - "Bearer <token>" with no blank at either end of the token, at most 8192 bytes: bearer;
 *   - an API-key header whose value is ASCII and at most 8192 bytes: apikey.
 * Anything else (other schemes, blanks, non-ASCII credentials, a needle found in the query
 * string or the cookies, repeated Cookie headers, unexpected types) calls the Python
 * classifier. The credential is never stored: its bytes are hashed and dropped.
 *
 * The fingerprint is Python's own hash() of the credential (SipHash-1-3 keyed with the
 * interpreter's secret), XORed with the instance's 64-bit salt, mixed when hash() is not
 * SipHash: the construction of memwatch.sketch.Fingerprinter, which explains it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_VALUE 8192

/* getattr(obj, name, None) without raising and catching AttributeError: 1 found, 0 not, -1 error */
static int
lookup_attr(PyObject *obj, PyObject *name, PyObject **result)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, result);
#else
    return _PyObject_LookupAttr(obj, name, result);
#endif
}
#define MIX_MULTIPLIER 0x9E3779B97F4A7C15ULL

typedef struct {
    PyObject_HEAD
    PyObject *append;          /* the queue's append: called with the record */
    PyObject *classify_scope;  /* AuthClassifier.from_scope: the reference for ASGI */
    PyObject *classify_environ;/* AuthClassifier.from_environ: the reference for WSGI */
    PyObject *fingerprint;     /* Fingerprinter.fingerprint: the reference fingerprint */
    PyObject *apikey_raw;      /* tuple of bytes: API-key header names, lower case */
    PyObject *apikey_environ;  /* tuple of str: the same as WSGI environ keys */
    PyObject *query_needles;   /* tuple of bytes: "name=" for each query parameter, lower case */
    PyObject *cookie_needles;  /* tuple of bytes: "name=" for each session cookie, lower case */
    unsigned char blank[256];  /* bytes whose latin-1 character str.isspace() is true for */
    uint64_t salt;
    int use_hash;              /* 0: every fingerprint through the reference (explicit key) */
    int mix;                   /* hash() is not SipHash: mix the fingerprint */
} Recorder;

static PyObject *str_bearer, *str_apikey, *str_anonymous, *str_get;
static PyObject *key_headers, *key_method, *key_query_string;
static PyObject *key_http_authorization, *key_query_env, *key_http_cookie, *key_request_method;
static PyObject *key_route_key, *key_route, *key_routes, *key_path, *key_fastapi, *key_context;
static PyObject *key_original_route, *key_root_path, *key_app, *str_unmatched, *str_root;

static int
Recorder_traverse(Recorder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->append);
    Py_VISIT(self->classify_scope);
    Py_VISIT(self->classify_environ);
    Py_VISIT(self->fingerprint);
    Py_VISIT(self->apikey_raw);
    Py_VISIT(self->apikey_environ);
    Py_VISIT(self->query_needles);
    Py_VISIT(self->cookie_needles);
    return 0;
}

static int
Recorder_clear(Recorder *self)
{
    Py_CLEAR(self->append);
    Py_CLEAR(self->classify_scope);
    Py_CLEAR(self->classify_environ);
    Py_CLEAR(self->fingerprint);
    Py_CLEAR(self->apikey_raw);
    Py_CLEAR(self->apikey_environ);
    Py_CLEAR(self->query_needles);
    Py_CLEAR(self->cookie_needles);
    return 0;
}

static void
Recorder_dealloc(Recorder *self)
{
    PyObject_GC_UnTrack(self);
    Recorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
check_bytes_tuple(PyObject *tuple, const char *what)
{
    if (!PyTuple_Check(tuple)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple", what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(tuple, i))) {
            PyErr_Format(PyExc_TypeError, "%s must hold bytes", what);
            return -1;
        }
    }
    return 0;
}

static int
Recorder_init(Recorder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {
        "append", "classify_scope", "classify_environ", "fingerprint", "apikey_raw",
        "apikey_environ", "query_needles", "cookie_needles", "blank", "salt", "mix", NULL};
    PyObject *append, *classify_scope, *classify_environ, *fingerprint;
    PyObject *apikey_raw, *apikey_environ, *query_needles, *cookie_needles, *salt;
    Py_buffer blank;
    int mix;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "OOOOO!O!O!O!y*Op", kwlist, &append, &classify_scope,
            &classify_environ, &fingerprint, &PyTuple_Type, &apikey_raw, &PyTuple_Type,
            &apikey_environ, &PyTuple_Type, &query_needles, &PyTuple_Type, &cookie_needles,
            &blank, &salt, &mix)) {
        return -1;
    }
    if (blank.len != 256) {
        PyBuffer_Release(&blank);
        PyErr_SetString(PyExc_ValueError, "blank must be 256 bytes");
        return -1;
    }
    memcpy(self->blank, blank.buf, 256);
    PyBuffer_Release(&blank);
    if (check_bytes_tuple(apikey_raw, "apikey_raw") < 0 ||
        check_bytes_tuple(query_needles, "query_needles") < 0 ||
        check_bytes_tuple(cookie_needles, "cookie_needles") < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(apikey_environ); i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(apikey_environ, i))) {
            PyErr_SetString(PyExc_TypeError, "apikey_environ must hold str");
            return -1;
        }
    }
    if (salt == Py_None) {
        self->use_hash = 0;
        self->salt = 0;
    }
    else {
        unsigned long long value = PyLong_AsUnsignedLongLong(salt);
        if (value == (unsigned long long)-1 && PyErr_Occurred()) {
            return -1;
        }
        self->use_hash = 1;
        self->salt = (uint64_t)value;
    }
    self->mix = mix;
    Py_XSETREF(self->append, Py_NewRef(append));
    Py_XSETREF(self->classify_scope, Py_NewRef(classify_scope));
    Py_XSETREF(self->classify_environ, Py_NewRef(classify_environ));
    Py_XSETREF(self->fingerprint, Py_NewRef(fingerprint));
    Py_XSETREF(self->apikey_raw, Py_NewRef(apikey_raw));
    Py_XSETREF(self->apikey_environ, Py_NewRef(apikey_environ));
    Py_XSETREF(self->query_needles, Py_NewRef(query_needles));
    Py_XSETREF(self->cookie_needles, Py_NewRef(cookie_needles));
    return 0;
}

/* --- helpers ------------------------------------------------------------------------------ */

static int
is_ascii(const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] & 0x80) {
            return 0;
        }
    }
    return 1;
}

static unsigned char
lower_ascii(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* Whether any needle (lower-case bytes) occurs in text, ignoring ASCII case. For latin-1 text
 * and ASCII needles this is what `needle in text.decode("latin-1").lower()` answers: lowering a
 * latin-1 character never makes or unmakes an ASCII one, nor changes the length. A needle with
 * a non-ASCII byte counts as found (the reference decides). */
static int
any_needle(PyObject *needles, const unsigned char *text, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(needles); k++) {
        PyObject *needle = PyTuple_GET_ITEM(needles, k);
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(needle);
        Py_ssize_t m = PyBytes_GET_SIZE(needle);
        if (m == 0 || !is_ascii(s, m)) {
            return 1;
        }
        for (Py_ssize_t i = 0; i + m <= n; i++) {
            if (lower_ascii(text[i]) != s[0]) {
                continue;
            }
            Py_ssize_t j = 1;
            while (j < m && lower_ascii(text[i + j]) == s[j]) {
                j++;
            }
            if (j == m) {
                return 1;
            }
        }
    }
    return 0;
}

/* The fingerprint of ASCII credential bytes; NULL with an exception set on failure. */
static PyObject *
fingerprint_ascii(Recorder *self, const char *data, Py_ssize_t n)
{
    PyObject *credential = PyBytes_FromStringAndSize(data, n);
    if (credential == NULL) {
        return NULL;
    }
    if (!self->use_hash) {
        PyObject *result = PyObject_CallOneArg(self->fingerprint, credential);
        Py_DECREF(credential);
        return result;
    }
    Py_hash_t h = PyObject_Hash(credential);
    Py_DECREF(credential);
    if (h == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint64_t value = (uint64_t)h ^ self->salt;
    if (self->mix) {
        value *= MIX_MULTIPLIER;
        value ^= value >> 32;
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)value);
}

/* Appends (template, path, method, auth, status, fingerprint); steals fp. */
static PyObject *
enqueue(Recorder *self, PyObject *template, PyObject *path, PyObject *method, PyObject *auth,
        PyObject *status, PyObject *fp)
{
    PyObject *record = PyTuple_New(6);
    if (record == NULL) {
        Py_DECREF(fp);
        return NULL;
    }
    PyTuple_SET_ITEM(record, 0, Py_NewRef(template));
    PyTuple_SET_ITEM(record, 1, Py_NewRef(path));
    PyTuple_SET_ITEM(record, 2, Py_NewRef(method));
    PyTuple_SET_ITEM(record, 3, Py_NewRef(auth));
    PyTuple_SET_ITEM(record, 4, Py_NewRef(status));
    PyTuple_SET_ITEM(record, 5, fp);
    PyObject *result = PyObject_CallOneArg(self->append, record);
    Py_DECREF(record);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_NONE;
}

/* The reference path: the Python classifier, then the Python fingerprint. */
static PyObject *
enqueue_reference(Recorder *self, PyObject *classify, PyObject *request, PyObject *template,
                  PyObject *path, PyObject *method, PyObject *status)
{
    PyObject *classified = PyObject_CallOneArg(classify, request);
    if (classified == NULL) {
        return NULL;
    }
    if (!PyTuple_Check(classified) || PyTuple_GET_SIZE(classified) != 2) {
        Py_DECREF(classified);
        PyErr_SetString(PyExc_TypeError, "the classifier must return (auth, credential)");
        return NULL;
    }
    PyObject *auth = PyTuple_GET_ITEM(classified, 0);
    PyObject *credential = PyTuple_GET_ITEM(classified, 1);
    PyObject *fp;
    int truthy = PyObject_IsTrue(credential);
    if (truthy < 0) {
        Py_DECREF(classified);
        return NULL;
    }
    if (truthy) {
        fp = PyObject_CallOneArg(self->fingerprint, credential);
        if (fp == NULL) {
            Py_DECREF(classified);
            return NULL;
        }
    }
    else {
        fp = Py_NewRef(Py_None);
    }
    PyObject *result = enqueue(self, template, path, method, auth, status, fp);
    Py_DECREF(classified);
    return result;
}

/* The request's method: the mapping's value when it is a non-empty str, else "GET" (what
 * `mapping.get(key) or "GET"` gives for the values servers put there). Borrowed. */
static PyObject *
method_of(PyObject *mapping, PyObject *key, int *other)
{
    PyObject *method = PyDict_GetItemWithError(mapping, key);
    if (method == NULL) {
        return PyErr_Occurred() ? NULL : str_get;
    }
    if (PyUnicode_CheckExact(method)) {
        return PyUnicode_GET_LENGTH(method) ? method : str_get;
    }
    *other = 1; /* an unusual value: the reference decides what "or" makes of it */
    return str_get;
}

/* The reference path for a request that is not a plain dict: its method as
 * `mapping.get(key) or "GET"` gives it, then the Python classifier. */
static PyObject *
enqueue_generic(Recorder *self, PyObject *classify, PyObject *request, PyObject *key,
                PyObject *template, PyObject *path, PyObject *status)
{
    PyObject *value = PyObject_CallMethod(request, "get", "O", key);
    if (value == NULL) {
        return NULL;
    }
    int truthy = PyObject_IsTrue(value);
    PyObject *result = NULL;
    if (truthy >= 0) {
        result = enqueue_reference(self, classify, request, template, path,
                                   truthy ? value : str_get, status);
    }
    Py_DECREF(value);
    return result;
}

/* record_scope(scope, template, path, status): an ASGI request. */
static PyObject *
Recorder_record_scope(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "record_scope() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *scope = args[0], *template = args[1], *path = args[2], *status = args[3];
    if (!PyDict_CheckExact(scope)) {
        return enqueue_generic(self, self->classify_scope, scope, key_method, template, path,
                               status);
    }
    int other = 0;
    PyObject *method = method_of(scope, key_method, &other);
    if (method == NULL) {
        return NULL;
    }
    if (other) {
        goto reference;
    }
    PyObject *headers = PyDict_GetItemWithError(scope, key_headers);
    if (headers == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    else if (!PyList_CheckExact(headers) && !PyTuple_CheckExact(headers)) {
        goto reference;
    }
    PyObject *authorization = NULL, *apikey = NULL, *cookie = NULL;
    Py_ssize_t count = headers == NULL ? 0 : PySequence_Fast_GET_SIZE(headers);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(headers, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) {
            goto reference;
        }
        PyObject *name = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value)) {
            goto reference;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(name);
        const char *s = PyBytes_AS_STRING(name);
        if (n == 13 && memcmp(s, "authorization", 13) == 0) {
            authorization = value;
        }
        else if (n == 6 && memcmp(s, "cookie", 6) == 0) {
            if (cookie != NULL) {
                goto reference; /* crumbs joined: the reference does it */
            }
            cookie = value;
        }
        else if (apikey == NULL || PyBytes_GET_SIZE(apikey) == 0) {
            PyObject *names = self->apikey_raw;
            for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(names); k++) {
                PyObject *wanted = PyTuple_GET_ITEM(names, k);
                if (PyBytes_GET_SIZE(wanted) == n &&
                    memcmp(PyBytes_AS_STRING(wanted), s, n) == 0) {
                    apikey = value;
                    break;
                }
            }
        }
    }
    PyObject *fp;
    if (authorization != NULL && PyBytes_GET_SIZE(authorization) > 0) {
        const unsigned char *a = (const unsigned char *)PyBytes_AS_STRING(authorization);
        Py_ssize_t n = PyBytes_GET_SIZE(authorization);
        if (n >= 8 && n <= MAX_VALUE && memcmp(a, "Bearer ", 7) == 0 && !self->blank[a[7]] &&
            !self->blank[a[n - 1]] && is_ascii(a + 7, n - 7)) {
            fp = fingerprint_ascii(self, (const char *)a + 7, n - 7);
            if (fp == NULL) {
                return NULL;
            }
            return enqueue(self, template, path, method, str_bearer, status, fp);
        }
        goto reference;
    }
    if (apikey != NULL && PyBytes_GET_SIZE(apikey) > 0) {
        const unsigned char *a = (const unsigned char *)PyBytes_AS_STRING(apikey);
        Py_ssize_t n = PyBytes_GET_SIZE(apikey);
        if (n > MAX_VALUE || !is_ascii(a, n)) {
            goto reference;
        }
        fp = fingerprint_ascii(self, (const char *)a, n);
        if (fp == NULL) {
            return NULL;
        }
        return enqueue(self, template, path, method, str_apikey, status, fp);
    }
    PyObject *query = PyDict_GetItemWithError(scope, key_query_string);
    if (query == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    else if (!PyBytes_CheckExact(query)) {
        goto reference;
    }
    else if (PyBytes_GET_SIZE(query) > 0) {
        Py_ssize_t n = PyBytes_GET_SIZE(query);
        if (any_needle(self->query_needles, (const unsigned char *)PyBytes_AS_STRING(query),
                       n > MAX_VALUE ? MAX_VALUE : n)) {
            goto reference;
        }
    }
    if (cookie != NULL && PyBytes_GET_SIZE(cookie) > 0) {
        Py_ssize_t n = PyBytes_GET_SIZE(cookie);
        if (any_needle(self->cookie_needles, (const unsigned char *)PyBytes_AS_STRING(cookie),
                       n > MAX_VALUE ? MAX_VALUE : n)) {
            goto reference;
        }
    }
    return enqueue(self, template, path, method, str_anonymous, status, Py_NewRef(Py_None));

reference:
    return enqueue_reference(self, self->classify_scope, scope, template, path, method, status);
}

/* The ASCII bytes of a str environ value, or NULL when it is not an ASCII str. */
static const unsigned char *
ascii_str(PyObject *value, Py_ssize_t *n)
{
    if (!PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value)) {
        return NULL;
    }
    *n = PyUnicode_GET_LENGTH(value);
    return (const unsigned char *)PyUnicode_DATA(value);
}

/* record_environ(environ, template, path, status): a WSGI request. */
static PyObject *
Recorder_record_environ(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "record_environ() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *environ = args[0], *template = args[1], *path = args[2], *status = args[3];
    if (!PyDict_CheckExact(environ)) {
        return enqueue_generic(self, self->classify_environ, environ, key_request_method,
                               template, path, status);
    }
    int other = 0;
    PyObject *method = method_of(environ, key_request_method, &other);
    if (method == NULL) {
        return NULL;
    }
    if (other) {
        goto reference;
    }
    Py_ssize_t n;
    const unsigned char *a;
    PyObject *value = PyDict_GetItemWithError(environ, key_http_authorization);
    if (value == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (value != NULL && value != Py_None) {
        a = ascii_str(value, &n);
        if (a == NULL) {
            goto reference;
        }
        if (n > 0) {
            if (n >= 8 && n <= MAX_VALUE && memcmp(a, "Bearer ", 7) == 0 &&
                !self->blank[a[7]] && !self->blank[a[n - 1]]) {
                PyObject *fp = fingerprint_ascii(self, (const char *)a + 7, n - 7);
                if (fp == NULL) {
                    return NULL;
                }
                return enqueue(self, template, path, method, str_bearer, status, fp);
            }
            goto reference;
        }
    }
    PyObject *keys = self->apikey_environ;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); k++) {
        value = PyDict_GetItemWithError(environ, PyTuple_GET_ITEM(keys, k));
        if (value == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            continue;
        }
        if (value == Py_None) {
            continue;
        }
        a = ascii_str(value, &n);
        if (a == NULL || n > MAX_VALUE) {
            goto reference;
        }
        if (n == 0) {
            continue;
        }
        PyObject *fp = fingerprint_ascii(self, (const char *)a, n);
        if (fp == NULL) {
            return NULL;
        }
        return enqueue(self, template, path, method, str_apikey, status, fp);
    }
    value = PyDict_GetItemWithError(environ, key_query_env);
    if (value == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (value != NULL && value != Py_None) {
        a = ascii_str(value, &n);
        if (a == NULL) {
            goto reference;
        }
        if (any_needle(self->query_needles, a, n > MAX_VALUE ? MAX_VALUE : n)) {
            goto reference;
        }
    }
    value = PyDict_GetItemWithError(environ, key_http_cookie);
    if (value == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (value != NULL && value != Py_None) {
        a = ascii_str(value, &n);
        if (a == NULL) {
            goto reference;
        }
        if (any_needle(self->cookie_needles, a, n > MAX_VALUE ? MAX_VALUE : n)) {
            goto reference;
        }
    }
    return enqueue(self, template, path, method, str_anonymous, status, Py_NewRef(Py_None));

reference:
    return enqueue_reference(self, self->classify_environ, environ, template, path, method,
                             status);
}

/* The route template Starlette or FastAPI matched (memwatch.routes.starlette_template), as a new
 * reference in *template (NULL: none). Returns 1 when decided, 0 when the Python function must
 * decide (a mount prefix to normalise, unusual types), -1 on error. */
static int
starlette_template(PyObject *scope, PyObject *entry_root_path, PyObject **template)
{
    *template = NULL;
    if (!PyUnicode_Check(entry_root_path)) {
        return 0;
    }
    PyObject *route = PyDict_GetItemWithError(scope, key_route);
    if (route == NULL) {
        return PyErr_Occurred() ? -1 : 1;
    }
    if (route == Py_None) {
        return 1;
    }
    PyObject *routes;
    int found = lookup_attr(route, key_routes, &routes);
    if (found < 0) {
        return -1;
    }
    if (found) {
        Py_DECREF(routes);
        return 1; /* a Mount or Host: no endpoint matched */
    }
    PyObject *path;
    if (lookup_attr(route, key_path, &path) < 0) {
        return -1;
    }
    PyObject *fastapi = PyDict_GetItemWithError(scope, key_fastapi);
    if (fastapi == NULL && PyErr_Occurred()) {
        Py_XDECREF(path);
        return -1;
    }
    if (fastapi != NULL && fastapi != Py_None) {
        if (!PyDict_CheckExact(fastapi)) {
            Py_XDECREF(path);
            return 0;
        }
        PyObject *context = PyDict_GetItemWithError(fastapi, key_context);
        if (context == NULL && PyErr_Occurred()) {
            Py_XDECREF(path);
            return -1;
        }
        if (context != NULL && context != Py_None) {
            PyObject *original;
            if (lookup_attr(context, key_original_route, &original) < 0) {
                Py_XDECREF(path);
                return -1;
            }
            int same = original == route;
            Py_XDECREF(original);
            if (same) {
                PyObject *effective;
                if (lookup_attr(context, key_path, &effective) < 0) {
                    Py_XDECREF(path);
                    return -1;
                }
                if (effective != NULL) {
                    Py_XSETREF(path, effective);
                }
            }
        }
    }
    if (path == NULL || !PyUnicode_Check(path)) {
        Py_XDECREF(path);
        return 1;
    }
    PyObject *root_path = PyDict_GetItemWithError(scope, key_root_path);
    if (root_path == NULL && PyErr_Occurred()) {
        Py_DECREF(path);
        return -1;
    }
    if (root_path != NULL && PyUnicode_Check(root_path) && PyUnicode_Check(entry_root_path) &&
        PyUnicode_GET_LENGTH(root_path) > PyUnicode_GET_LENGTH(entry_root_path)) {
        Py_DECREF(path);
        return 0; /* mounted below a prefix: normalised in Python */
    }
    if (root_path != NULL && !PyUnicode_Check(root_path)) {
        Py_DECREF(path);
        return 0;
    }
    *template = path;
    return 1;
}

/* finish_scope(scope, status, entry_root_path, unmatched): the end of an ASGI request on the
 * fast path, as ASGIMiddleware.finish does it: the route template (memwatch's own key, else
 * Starlette's matched route), "__unmatched__" for a 404 without one in a framework, else the
 * raw path; then record_scope. True when recorded; False when the request needs the Python
 * path (nothing is recorded then). */
static PyObject *
Recorder_finish_scope(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "finish_scope() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *scope = args[0], *status = args[1], *entry_root_path = args[2];
    int unmatched = PyObject_IsTrue(args[3]);
    if (unmatched < 0) {
        return NULL;
    }
    if (!PyDict_CheckExact(scope)) {
        Py_RETURN_FALSE;
    }
    PyObject *template = PyDict_GetItemWithError(scope, key_route_key);
    if (template == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (template != NULL && template != Py_None) {
        if (!PyUnicode_CheckExact(template) || PyUnicode_GET_LENGTH(template) == 0) {
            Py_RETURN_FALSE;
        }
        Py_INCREF(template);
    }
    else {
        int decided = starlette_template(scope, entry_root_path, &template);
        if (decided < 0) {
            return NULL;
        }
        if (decided == 0) {
            Py_RETURN_FALSE;
        }
    }
    PyObject *path = Py_None;
    if (template == NULL) {
        if (!PyLong_Check(status)) {
            Py_RETURN_FALSE;
        }
        long code = PyLong_AsLong(status);
        if (code == -1 && PyErr_Occurred()) {
            PyErr_Clear(); /* too large for a long: not a 404 */
        }
        int is_404 = code == 404;
        if (is_404 && !unmatched) {
            unmatched = PyDict_Contains(scope, key_app);
            if (unmatched < 0) {
                return NULL;
            }
        }
        if (is_404 && unmatched) {
            template = Py_NewRef(str_unmatched);
        }
        else {
            template = Py_NewRef(Py_None);
            path = PyDict_GetItemWithError(scope, key_path);
            if (path == NULL) {
                if (PyErr_Occurred()) {
                    Py_DECREF(template);
                    return NULL;
                }
                path = str_root;
            }
            else if (!PyUnicode_CheckExact(path)) {
                Py_DECREF(template);
                Py_RETURN_FALSE;
            }
            else if (PyUnicode_GET_LENGTH(path) == 0) {
                path = str_root;
            }
        }
    }
    PyObject *record_args[4] = {scope, template, path, status};
    PyObject *result = Recorder_record_scope(self, record_args, 4);
    Py_DECREF(template);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_TRUE;
}

static PyMethodDef Recorder_methods[] = {
    {"finish_scope", (PyCFunction)(void (*)(void))Recorder_finish_scope, METH_FASTCALL,
     "finish_scope(scope, status, entry_root_path, unmatched) -> bool: the fast path's end of "
     "an ASGI request (False: the Python path must record it)."},
    {"record_scope", (PyCFunction)(void (*)(void))Recorder_record_scope, METH_FASTCALL,
     "record_scope(scope, template, path, status): queue an ASGI request's record."},
    {"record_environ", (PyCFunction)(void (*)(void))Recorder_record_environ, METH_FASTCALL,
     "record_environ(environ, template, path, status): queue a WSGI request's record."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.Recorder",
    .tp_doc = "Classifies, fingerprints and queues a request's record (see the module).",
    .tp_basicsize = sizeof(Recorder),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Recorder_init,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear,
    .tp_methods = Recorder_methods,
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "memwatch._speedups",
    .m_doc = "The per-request recording path of memwatch, in C (optional; see memwatch.fast).",
    .m_size = -1,
};

static int
intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (intern(&str_bearer, "bearer") < 0 || intern(&str_apikey, "apikey") < 0 ||
        intern(&str_anonymous, "anonymous") < 0 || intern(&str_get, "GET") < 0 ||
        intern(&key_headers, "headers") < 0 || intern(&key_method, "method") < 0 ||
        intern(&key_query_string, "query_string") < 0 ||
        intern(&key_http_authorization, "HTTP_AUTHORIZATION") < 0 ||
        intern(&key_query_env, "QUERY_STRING") < 0 || intern(&key_http_cookie, "HTTP_COOKIE") < 0 ||
        intern(&key_request_method, "REQUEST_METHOD") < 0 ||
        intern(&key_route_key, "memwatch.route") < 0 || intern(&key_route, "route") < 0 ||
        intern(&key_routes, "routes") < 0 || intern(&key_path, "path") < 0 ||
        intern(&key_fastapi, "fastapi") < 0 ||
        intern(&key_context, "effective_route_context") < 0 ||
        intern(&key_original_route, "original_route") < 0 ||
        intern(&key_root_path, "root_path") < 0 || intern(&key_app, "app") < 0 ||
        intern(&str_unmatched, "__unmatched__") < 0 || intern(&str_root, "/") < 0) {
        return NULL;
    }
    if (PyType_Ready(&RecorderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Recorder", (PyObject *)&RecorderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
