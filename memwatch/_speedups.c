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
 * classifier. The credential is never stored: its bytes are hashed and dropped. (An ordinary
 * ASGI request is recorded in a batch: its headers list, the server's, is held until the batch
 * is counted, at most BATCH_SIZE requests; see keep_request and flush_batch.)
 *
 * The fingerprint is keyed_hash() below, keyed with the Fingerprinter's random 128-bit key;
 * memwatch.sketch.Fingerprinter calls the same function (keyed_hash, exported) for the
 * credentials the Python classifier decides, so both paths give one credential one value.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

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
/* Odd 64-bit constants of the fingerprint hash: 2**64 over the golden ratio (made odd), and
 * two more with about as many one bits as zero bits, spread. */
#define HASH_P0 0x9E3779B97F4A7C15ULL
#define HASH_P1 0xD6E8FEB86659FD93ULL
#define HASH_P2 0xCA5A826395121157ULL

#define ROUTE_MEMO 8
#define BATCH_SIZE 16 /* requests kept before the recorder classifies and counts them */
#define FAST_SCHEMES 2 /* bearer, apikey: see fast_scheme() */

/* One request kept for a batch: strong references; headers and query may be NULL (absent). */
typedef struct {
    PyObject *template, *path, *method, *headers, *query, *status;
} Kept;

typedef struct {
    PyObject_HEAD
    PyObject *append;          /* the queue's append: called with the record */
    PyObject *classify_scope;  /* AuthClassifier.from_scope: the reference for ASGI */
    PyObject *classify_environ;/* AuthClassifier.from_environ: the reference for WSGI */
    PyObject *fingerprint;     /* Fingerprinter.fingerprint: the reference fingerprint */
    PyObject *apikey_raw;      /* tuple of bytes: API-key header names, lower case */
    uint64_t apikey_lengths;   /* bit n set: an API-key header name is n bytes long (63: >= 63) */
    PyObject *apikey_environ;  /* tuple of str: the same as WSGI environ keys */
    PyObject *query_needles;   /* tuple of bytes: "name=" for each query parameter, lower case */
    PyObject *cookie_needles;  /* tuple of bytes: "name=" for each session cookie, lower case */
    int query_mode, cookie_mode; /* how to search for each set of needles (needle_mode) */
    unsigned char blank[256];  /* bytes whose latin-1 character str.isspace() is true for */
    uint64_t key[2];           /* the fingerprint hash's key (Fingerprinter.hash_key) */
    int use_hash;              /* 0: every fingerprint through the reference (explicit key) */
    /* Tally mode (sketches given): requests are counted here, not queued. */
    PyObject *sketches;        /* dict: auth scheme -> (registers bytearray, shift) */
    PyObject *counts;          /* dict: (template, path, method, auth, status) -> count */
    PyObject *run_key;         /* the label set of the current run of equal requests */
    Py_ssize_t run_count;
    PyObject *noted;           /* list: fingerprints sampled for the first-seen filter */
    uint64_t last_noted;
    int has_noted;
    Py_ssize_t dropped;        /* requests not counted: the tally was full (never drained) */
    /* The sketches of the schemes the fast path decides itself (bearer, apikey), resolved
     * from `sketches` once when the recorder is made, not looked up at every request. */
    struct {
        PyObject *registers;   /* the HyperLogLog's bytearray, or NULL: no sketch */
        int shift;
    } fast_sketch[FAST_SCHEMES];
    /* What the last few Starlette route objects said (see starlette_template): a route's
     * `routes` and `path` attributes are read once, not at every request. */
    struct {
        PyObject *route;       /* held: at most ROUTE_MEMO routes are kept alive by this */
        PyObject *path;        /* its `path` when a str, else NULL */
        int mount;             /* it has `routes`: a Mount or Host, no endpoint matched */
    } route_memo[ROUTE_MEMO];
    /* Requests kept for a batch (tally mode, ASGI, not measured): what record_scope reads of
     * each, held until flush_batch() counts them all in a row, with the code and the tally
     * hot in the caches (see flush_batch). Never the scope, which holds the app's objects. */
    Kept batch[BATCH_SIZE];
    int batched;
    int batch_limit;           /* requests kept before they are counted: 0 (none) to BATCH_SIZE */
} Recorder;

static int flush_batch(Recorder *self);

#define TALLY_MAX_KEYS 65536
#define TALLY_MAX_NOTED 65536
#define FIRST_SEEN_SAMPLING 4

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
    Py_VISIT(self->sketches);
    Py_VISIT(self->counts);
    Py_VISIT(self->run_key);
    Py_VISIT(self->noted);
    for (int i = 0; i < ROUTE_MEMO; i++) {
        Py_VISIT(self->route_memo[i].route);
        Py_VISIT(self->route_memo[i].path);
    }
    for (int i = 0; i < FAST_SCHEMES; i++) {
        Py_VISIT(self->fast_sketch[i].registers);
    }
    for (int i = 0; i < self->batched; i++) {
        Kept *k = &self->batch[i];
        Py_VISIT(k->template);
        Py_VISIT(k->path);
        Py_VISIT(k->method);
        Py_VISIT(k->headers);
        Py_VISIT(k->query);
        Py_VISIT(k->status);
    }
    return 0;
}

/* Drops the references of n kept requests. */
static void
release_kept(Kept *kept, int n)
{
    for (int i = 0; i < n; i++) {
        Py_XDECREF(kept[i].template);
        Py_XDECREF(kept[i].path);
        Py_XDECREF(kept[i].method);
        Py_XDECREF(kept[i].headers);
        Py_XDECREF(kept[i].query);
        Py_XDECREF(kept[i].status);
    }
}

/* Drops the kept requests uncounted (they belong to a tally being dropped: a reset, a fork's
 * child, whose parent counts them, or a re-initialised recorder). The batch is emptied before
 * any reference goes: a deallocation may run Python code that comes back here. */
static void
drop_batch(Recorder *self)
{
    int n = self->batched;
    Kept kept[BATCH_SIZE];
    memcpy(kept, self->batch, sizeof(Kept) * (size_t)n);
    self->batched = 0;
    release_kept(kept, n);
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
    Py_CLEAR(self->sketches);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->run_key);
    Py_CLEAR(self->noted);
    for (int i = 0; i < ROUTE_MEMO; i++) {
        Py_CLEAR(self->route_memo[i].route);
        Py_CLEAR(self->route_memo[i].path);
    }
    for (int i = 0; i < FAST_SCHEMES; i++) {
        Py_CLEAR(self->fast_sketch[i].registers);
    }
    drop_batch(self);
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

static int needle_mode(PyObject *needles);

/* The bit that stands for a header name's length in Recorder.apikey_lengths. */
static inline uint64_t
length_bit(Py_ssize_t n)
{
    return ((uint64_t)1) << (n < 63 ? n : 63);
}

/* --- the fingerprint hash ------------------------------------------------------------------
 *
 * keyed_hash(key, bytes) is a 64-bit hash keyed with 128 random bits, built on the folded
 * multiply (the high and low halves of a 64x64-bit product, XORed): sixteen bytes per product,
 * each word XORed with a key word or with the running state first, the length in the initial
 * state (so that zero padding of the tail is unambiguous), and a multiply-xorshift at the end
 * so that every input bit reaches the top bits (the HyperLogLog register index) and the low
 * bits (the Bloom filter's positions). About 200 instructions for a 150-byte token (callgrind,
 * benchmarks/instructions.py's Bearer tokens), against about 700 for hash() of the same bytes
 * (SipHash-1-3) and 20,000 for keyed BLAKE2b.
 *
 * It is not a MAC and need not be one: fingerprints never leave the process (only counts are
 * exported), and whoever can read the process's memory to see the sketches can read the key.
 * The key keeps fingerprints from being computed, or collisions made, without it. */

static inline uint64_t
fold_multiply(uint64_t a, uint64_t b)
{
#ifdef __SIZEOF_INT128__
    __uint128_t product = (__uint128_t)a * b;
    return (uint64_t)(product >> 64) ^ (uint64_t)product;
#else
    uint64_t a_lo = a & 0xFFFFFFFFULL, a_hi = a >> 32, b_lo = b & 0xFFFFFFFFULL, b_hi = b >> 32;
    uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
    uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFULL) + lo_hi;
    uint64_t high = hi_hi + (hi_lo >> 32) + (cross >> 32);
    uint64_t low = (cross << 32) | (lo_lo & 0xFFFFFFFFULL);
    return high ^ low;
#endif
}

static uint64_t
keyed_hash(const uint64_t key[2], const unsigned char *p, Py_ssize_t n)
{
    uint64_t h = key[0] ^ ((uint64_t)n * HASH_P0);
    uint64_t a = 0, b = 0;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        memcpy(&a, p + i, 8);
        memcpy(&b, p + i + 8, 8);
        h = fold_multiply(a ^ key[1], b ^ h);
    }
    a = 0;
    b = 0;
    Py_ssize_t rest = n - i;
    if (rest > 8) {
        memcpy(&a, p + i, 8);
        memcpy(&b, p + i + 8, (size_t)(rest - 8));
    }
    else if (rest > 0) {
        memcpy(&a, p + i, (size_t)rest);
    }
    h = fold_multiply(a ^ key[1] ^ HASH_P1, b ^ h ^ HASH_P2);
    h = fold_multiply(h ^ key[0], HASH_P0);
    h ^= h >> 29;
    h *= HASH_P1;
    h ^= h >> 32;
    return h;
}

/* The 16-byte key (bytes) as two words, little-endian. -1 with an exception when it is not. */
static int
parse_hash_key(PyObject *hash_key, uint64_t key[2])
{
    if (!PyBytes_Check(hash_key) || PyBytes_GET_SIZE(hash_key) != 16) {
        PyErr_SetString(PyExc_ValueError, "hash_key must be 16 bytes or None");
        return -1;
    }
    const unsigned char *k = (const unsigned char *)PyBytes_AS_STRING(hash_key);
    for (int w = 0; w < 2; w++) {
        uint64_t word = 0;
        for (int j = 7; j >= 0; j--) {
            word = (word << 8) | k[8 * w + j];
        }
        key[w] = word;
    }
    return 0;
}

/* keyed_hash(key, credential) -> int: the fingerprint hash of bytes (any buffer) or of a str's
 * UTF-8 encoding (surrogatepass, so that no header value makes it raise). */
static PyObject *
speedups_keyed_hash(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "keyed_hash(key, credential) takes 2 arguments");
        return NULL;
    }
    uint64_t key[2];
    if (parse_hash_key(args[0], key) < 0) {
        return NULL;
    }
    PyObject *credential = args[1];
    uint64_t h;
    if (PyBytes_CheckExact(credential)) {
        h = keyed_hash(key, (const unsigned char *)PyBytes_AS_STRING(credential),
                       PyBytes_GET_SIZE(credential));
    }
    else if (PyUnicode_Check(credential)) {
        if (PyUnicode_IS_ASCII(credential)) { /* its UTF-8 encoding is its data */
            h = keyed_hash(key, (const unsigned char *)PyUnicode_DATA(credential),
                           PyUnicode_GET_LENGTH(credential));
        }
        else {
            PyObject *encoded = PyUnicode_AsEncodedString(credential, "utf-8", "surrogatepass");
            if (encoded == NULL) {
                return NULL;
            }
            h = keyed_hash(key, (const unsigned char *)PyBytes_AS_STRING(encoded),
                           PyBytes_GET_SIZE(encoded));
            Py_DECREF(encoded);
        }
    }
    else {
        Py_buffer view;
        if (PyObject_GetBuffer(credential, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        h = keyed_hash(key, (const unsigned char *)view.buf, view.len);
        PyBuffer_Release(&view);
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)h);
}

static int
Recorder_init(Recorder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {
        "append", "classify_scope", "classify_environ", "fingerprint", "apikey_raw",
        "apikey_environ", "query_needles", "cookie_needles", "blank", "hash_key",
        "sketches", NULL};
    PyObject *append, *classify_scope, *classify_environ, *fingerprint;
    PyObject *apikey_raw, *apikey_environ, *query_needles, *cookie_needles, *hash_key;
    PyObject *sketches = Py_None;
    Py_buffer blank;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "OOOOO!O!O!O!y*O|O", kwlist, &append, &classify_scope,
            &classify_environ, &fingerprint, &PyTuple_Type, &apikey_raw, &PyTuple_Type,
            &apikey_environ, &PyTuple_Type, &query_needles, &PyTuple_Type, &cookie_needles,
            &blank, &hash_key, &sketches)) {
        return -1;
    }
    uint64_t key[2] = {0, 0};
    if (hash_key != Py_None && parse_hash_key(hash_key, key) < 0) {
        PyBuffer_Release(&blank);
        return -1;
    }
    if (sketches != Py_None) {
        if (!PyDict_Check(sketches)) {
            PyBuffer_Release(&blank);
            PyErr_SetString(PyExc_TypeError, "sketches must be a dict or None");
            return -1;
        }
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(sketches, &pos, &key, &value)) {
            if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 2 ||
                !PyByteArray_Check(PyTuple_GET_ITEM(value, 0)) ||
                !PyLong_Check(PyTuple_GET_ITEM(value, 1))) {
                PyBuffer_Release(&blank);
                PyErr_SetString(PyExc_TypeError,
                                "sketches must map schemes to (bytearray, shift)");
                return -1;
            }
            long shift = PyLong_AsLong(PyTuple_GET_ITEM(value, 1));
            Py_ssize_t size = PyByteArray_GET_SIZE(PyTuple_GET_ITEM(value, 0));
            if (shift < 46 || shift > 60 || size != ((Py_ssize_t)1 << (64 - shift))) {
                PyBuffer_Release(&blank);
                PyErr_SetString(PyExc_ValueError, "a sketch's registers do not match its shift");
                return -1;
            }
        }
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
    self->batch_limit = BATCH_SIZE;
    self->use_hash = hash_key != Py_None;
    self->key[0] = key[0];
    self->key[1] = key[1];
    Py_XSETREF(self->append, Py_NewRef(append));
    Py_XSETREF(self->classify_scope, Py_NewRef(classify_scope));
    Py_XSETREF(self->classify_environ, Py_NewRef(classify_environ));
    Py_XSETREF(self->fingerprint, Py_NewRef(fingerprint));
    Py_XSETREF(self->apikey_raw, Py_NewRef(apikey_raw));
    self->apikey_lengths = 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(apikey_raw); k++) {
        self->apikey_lengths |= length_bit(PyBytes_GET_SIZE(PyTuple_GET_ITEM(apikey_raw, k)));
    }
    Py_XSETREF(self->apikey_environ, Py_NewRef(apikey_environ));
    Py_XSETREF(self->query_needles, Py_NewRef(query_needles));
    Py_XSETREF(self->cookie_needles, Py_NewRef(cookie_needles));
    self->query_mode = needle_mode(query_needles);
    self->cookie_mode = needle_mode(cookie_needles);
    drop_batch(self);
    Py_CLEAR(self->sketches);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->run_key);
    Py_CLEAR(self->noted);
    self->run_count = 0;
    self->has_noted = 0;
    self->dropped = 0;
    for (int i = 0; i < FAST_SCHEMES; i++) {
        Py_CLEAR(self->fast_sketch[i].registers);
        self->fast_sketch[i].shift = 0;
    }
    if (sketches != Py_None) {
        self->sketches = Py_NewRef(sketches);
        PyObject *schemes[FAST_SCHEMES] = {str_bearer, str_apikey};
        for (int i = 0; i < FAST_SCHEMES; i++) {
            PyObject *sketch = PyDict_GetItemWithError(sketches, schemes[i]);
            if (sketch == NULL && PyErr_Occurred()) {
                return -1;
            }
            if (sketch != NULL) { /* checked above: (bytearray, shift) */
                self->fast_sketch[i].registers = Py_NewRef(PyTuple_GET_ITEM(sketch, 0));
                self->fast_sketch[i].shift = (int)PyLong_AsLong(PyTuple_GET_ITEM(sketch, 1));
            }
        }
        self->counts = PyDict_New();
        self->noted = PyList_New(0);
        if (self->counts == NULL || self->noted == NULL) {
            return -1;
        }
    }
    return 0;
}

/* --- helpers ------------------------------------------------------------------------------ */

/* Whether no byte of p[0:n] has its high bit set: eight bytes per step (a 150-byte token is
 * 19 words instead of 150 bytes, each a load, a test and a branch). */
static int
is_ascii(const unsigned char *p, Py_ssize_t n)
{
    uint64_t seen = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        memcpy(&word, p + i, 8);
        seen |= word;
    }
    for (; i < n; i++) {
        seen |= p[i];
    }
    return (seen & 0x8080808080808080ULL) == 0;
}

static unsigned char
lower_ascii(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* Whether the m bytes at text are the needle (lower-case bytes), ignoring ASCII case. */
static int
needle_at(const unsigned char *text, const unsigned char *needle, Py_ssize_t m)
{
    for (Py_ssize_t j = 0; j < m; j++) {
        if (lower_ascii(text[j]) != needle[j]) {
            return 0;
        }
    }
    return 1;
}

/* How a set of needles is searched for, decided once when the recorder is made. */
enum {
    NEEDLES_ALWAYS, /* an empty or non-ASCII needle: every text goes to the reference */
    NEEDLES_EQUALS, /* every needle is "name=": look only where an '=' is */
    NEEDLES_SCAN,   /* anything else: every position */
};

static int
needle_mode(PyObject *needles)
{
    int mode = NEEDLES_EQUALS;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(needles); k++) {
        PyObject *needle = PyTuple_GET_ITEM(needles, k);
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(needle);
        Py_ssize_t m = PyBytes_GET_SIZE(needle);
        if (m == 0 || !is_ascii(s, m)) {
            return NEEDLES_ALWAYS;
        }
        if (s[m - 1] != '=') {
            mode = NEEDLES_SCAN;
        }
    }
    return mode;
}

/* Whether any needle (lower-case bytes) occurs in the first MAX_VALUE bytes of text, ignoring
 * ASCII case. For latin-1 text and ASCII needles this is what
 * `needle in text.decode("latin-1").lower()` answers: lowering a latin-1 character never makes
 * or unmakes an ASCII one, nor changes the length. A needle that is empty or has a non-ASCII
 * byte counts as found (the reference decides). `mode` is needle_mode(needles). */
static int
any_needle(PyObject *needles, int mode, const unsigned char *text, Py_ssize_t n)
{
    if (mode == NEEDLES_ALWAYS) {
        return 1;
    }
    if (n > MAX_VALUE) {
        n = MAX_VALUE;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(needles);
    if (mode == NEEDLES_EQUALS) {
        /* Every needle is "name=": look only where an '=' is (a few per cookie or query). */
        const unsigned char *at = text, *end = text + n;
        while (at < end && (at = memchr(at, '=', (size_t)(end - at))) != NULL) {
            Py_ssize_t i = at - text; /* the '=' */
            for (Py_ssize_t k = 0; k < count; k++) {
                PyObject *needle = PyTuple_GET_ITEM(needles, k);
                Py_ssize_t m = PyBytes_GET_SIZE(needle);
                if (i + 1 >= m &&
                    needle_at(text + i + 1 - m, (const unsigned char *)PyBytes_AS_STRING(needle),
                              m - 1)) {
                    return 1;
                }
            }
            at++;
        }
        return 0;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *needle = PyTuple_GET_ITEM(needles, k);
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(needle);
        Py_ssize_t m = PyBytes_GET_SIZE(needle);
        for (Py_ssize_t i = 0; i + m <= n; i++) {
            if (needle_at(text + i, s, m)) {
                return 1;
            }
        }
    }
    return 0;
}

/* The fingerprint's value for ASCII credential bytes (use_hash only). */
static uint64_t
hash_ascii(Recorder *self, const char *data, Py_ssize_t n)
{
    return keyed_hash(self->key, (const unsigned char *)data, n);
}

/* The fingerprint of ASCII credential bytes; NULL with an exception set on failure. */
static PyObject *
fingerprint_ascii(Recorder *self, const char *data, Py_ssize_t n)
{
    if (!self->use_hash) {
        PyObject *credential = PyBytes_FromStringAndSize(data, n);
        if (credential == NULL) {
            return NULL;
        }
        PyObject *result = PyObject_CallOneArg(self->fingerprint, credential);
        Py_DECREF(credential);
        return result;
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)hash_ascii(self, data, n));
}

/* Whether two label values are the same for counting: identical, or equal str or int. */
static int
same_label(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    if (PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b)) {
        return PyUnicode_GET_LENGTH(a) == PyUnicode_GET_LENGTH(b) &&
               PyUnicode_Compare(a, b) == 0;
    }
    if (PyLong_CheckExact(a) && PyLong_CheckExact(b)) {
        int equal = PyObject_RichCompareBool(a, b, Py_EQ);
        if (equal < 0) {
            PyErr_Clear();
            return 0;
        }
        return equal;
    }
    return 0;
}

/* Folds the current run into the counts. -1 on error. */
static int
flush_run(Recorder *self)
{
    if (self->run_key == NULL || self->run_count == 0) {
        return 0;
    }
    /* Strong references: hashing a label of an unusual type may run Python code, and another
     * thread may then take() the counts or start a new run. */
    PyObject *key = Py_NewRef(self->run_key);
    PyObject *counts = Py_NewRef(self->counts);
    Py_ssize_t add = self->run_count;
    self->run_count = 0;
    int rc = -1;
    PyObject *current = PyDict_GetItemWithError(counts, key);
    if (current == NULL && PyErr_Occurred()) {
        goto done;
    }
    if (current == NULL && PyDict_GET_SIZE(counts) >= TALLY_MAX_KEYS) {
        self->dropped += add; /* bounded: a host that never drains loses counts, not memory */
        rc = 0;
        goto done;
    }
    Py_ssize_t total = add;
    if (current != NULL) {
        Py_ssize_t have = PyLong_AsSsize_t(current);
        if (have == -1 && PyErr_Occurred()) {
            goto done;
        }
        total += have;
    }
    PyObject *value = PyLong_FromSsize_t(total);
    if (value == NULL) {
        goto done;
    }
    rc = PyDict_SetItem(counts, key, value);
    Py_DECREF(value);
done:
    Py_DECREF(counts);
    Py_DECREF(key);
    return rc;
}

/* The number of bits of x (int.bit_length()): 0 for 0. */
static inline int
bit_length(uint64_t x)
{
#if defined(__GNUC__) || defined(__clang__)
    return x ? 64 - __builtin_clzll(x) : 0;
#else
    int bits = 0;
    while (x) {
        bits++;
        x >>= 1;
    }
    return bits;
#endif
}

/* Folds a fingerprint's value into its scheme's HyperLogLog (the register keeps the largest
 * rank) and samples it for the first-seen filter, as Monitor's drain does for queued records.
 * fp is the value as a Python int, or NULL: it is made only when the value is noted. */
static int
tally_hash(Recorder *self, PyObject *auth, uint64_t h, PyObject *fp)
{
    PyObject *registers = NULL;
    int shift = 0;
    int fast = auth == str_bearer ? 0 : auth == str_apikey ? 1 : -1;
    if (fast >= 0) { /* the fast path's schemes: resolved when the recorder was made */
        registers = self->fast_sketch[fast].registers;
        shift = self->fast_sketch[fast].shift;
    }
    else {
        PyObject *sketch = PyDict_GetItemWithError(self->sketches, auth);
        if (sketch == NULL && PyErr_Occurred()) {
            return -1;
        }
        if (sketch != NULL) {
            registers = PyTuple_GET_ITEM(sketch, 0);
            shift = (int)PyLong_AsLong(PyTuple_GET_ITEM(sketch, 1));
        }
    }
    if (registers != NULL) {
        uint64_t rest = h & ((((uint64_t)1) << shift) - 1);
        int bits = bit_length(rest);
        unsigned char rank = (unsigned char)(shift - bits + 1);
        Py_ssize_t index = (Py_ssize_t)(h >> shift);
        unsigned char *cells = (unsigned char *)PyByteArray_AS_STRING(registers);
        if (index < PyByteArray_GET_SIZE(registers) && rank > cells[index]) {
            cells[index] = rank;
        }
    }
    if (h % FIRST_SEEN_SAMPLING == 0 && !(self->has_noted && self->last_noted == h) &&
        PyList_GET_SIZE(self->noted) < TALLY_MAX_NOTED) {
        PyObject *value = fp != NULL ? Py_NewRef(fp)
                                     : PyLong_FromUnsignedLongLong((unsigned long long)h);
        if (value == NULL) {
            return -1;
        }
        int rc = PyList_Append(self->noted, value);
        Py_DECREF(value);
        if (rc < 0) {
            return -1;
        }
        self->last_noted = h;
        self->has_noted = 1;
    }
    return 0;
}

/* Counts a request's labels in tally mode: the current run, or a new one. -1 on error. */
static int
tally_labels(Recorder *self, PyObject *template, PyObject *path, PyObject *method,
             PyObject *auth, PyObject *status)
{
    PyObject *key = self->run_key; /* the comparisons below run no Python code */
    if (!(key != NULL &&
          same_label(PyTuple_GET_ITEM(key, 0), template) &&
          same_label(PyTuple_GET_ITEM(key, 1), path) &&
          same_label(PyTuple_GET_ITEM(key, 2), method) &&
          same_label(PyTuple_GET_ITEM(key, 3), auth) &&
          same_label(PyTuple_GET_ITEM(key, 4), status))) {
        if (flush_run(self) < 0) {
            return -1;
        }
        PyObject *labels = PyTuple_Pack(5, template, path, method, auth, status);
        if (labels == NULL) {
            return -1;
        }
        Py_XSETREF(self->run_key, labels);
    }
    self->run_count++;
    return 0;
}

/* Counts a request in tally mode; steals fp. */
static PyObject *
tally(Recorder *self, PyObject *template, PyObject *path, PyObject *method, PyObject *auth,
      PyObject *status, PyObject *fp)
{
    int rc = tally_labels(self, template, path, method, auth, status);
    if (rc == 0 && fp != Py_None) {
        uint64_t h = (uint64_t)PyLong_AsUnsignedLongLong(fp);
        rc = h == (uint64_t)-1 && PyErr_Occurred() ? -1 : tally_hash(self, auth, h, fp);
    }
    Py_DECREF(fp);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* take() -> (counts, noted, dropped): what was tallied since the last take, handed over:
 * {(template, path, method, auth, status): requests}, the fingerprints sampled for the
 * first-seen filter, and the requests that found the tally full. */
static PyObject *
Recorder_take(Recorder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->counts == NULL) {
        return Py_BuildValue("({}[]n)", (Py_ssize_t)0);
    }
    if (flush_batch(self) < 0 || flush_run(self) < 0) {
        return NULL;
    }
    PyObject *counts = PyDict_New();
    PyObject *noted = PyList_New(0);
    if (counts == NULL || noted == NULL) {
        Py_XDECREF(counts);
        Py_XDECREF(noted);
        return NULL;
    }
    PyObject *old_counts = self->counts, *old_noted = self->noted;
    self->counts = counts;
    self->noted = noted;
    self->has_noted = 0;
    Py_ssize_t dropped = self->dropped;
    self->dropped = 0;
    return Py_BuildValue("(NNn)", old_counts, old_noted, dropped);
}

/* A measured request's record: handed to Monitor.record_measured with the request's probe,
 * instead of being queued or tallied. Passed down the recording functions (NULL: an ordinary
 * request), never kept on the recorder, which other threads share. */
typedef struct {
    PyObject *record_measured; /* the monitor's bound record_measured */
    PyObject *probe;           /* the measured request's probe */
} Capture;

/* Appends (template, path, method, auth, status, fingerprint), or hands a measured request to
 * record_measured(template, path, method, auth, status, fingerprint, probe); steals fp. */
static PyObject *
enqueue(Recorder *self, PyObject *template, PyObject *path, PyObject *method, PyObject *auth,
        PyObject *status, PyObject *fp, Capture *cap)
{
    if (cap != NULL) {
        PyObject *args[7] = {template, path, method, auth, status, fp, cap->probe};
        PyObject *label = PyObject_Vectorcall(cap->record_measured, args, 7, NULL);
        Py_DECREF(fp);
        if (label == NULL) {
            return NULL;
        }
        Py_DECREF(label);
        Py_RETURN_NONE;
    }
    if (self->counts != NULL) {
        return tally(self, template, path, method, auth, status, fp);
    }
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

/* Records a request whose credential is the ASCII bytes data[0:n] (the common cases). In tally
 * mode with the built-in hash the fingerprint's value goes straight into the sketches: no
 * Python int is made for it unless it is noted for the first-seen filter. */
static PyObject *
enqueue_ascii(Recorder *self, PyObject *template, PyObject *path, PyObject *method,
              PyObject *auth, PyObject *status, const char *data, Py_ssize_t n, Capture *cap)
{
    if (cap != NULL || self->counts == NULL || !self->use_hash) {
        PyObject *fp = fingerprint_ascii(self, data, n);
        if (fp == NULL) {
            return NULL;
        }
        return enqueue(self, template, path, method, auth, status, fp, cap);
    }
    if (tally_labels(self, template, path, method, auth, status) < 0 ||
        tally_hash(self, auth, hash_ascii(self, data, n), NULL) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The reference path: the Python classifier, then the Python fingerprint. */
static PyObject *
enqueue_reference(Recorder *self, PyObject *classify, PyObject *request, PyObject *template,
                  PyObject *path, PyObject *method, PyObject *status, Capture *cap)
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
    PyObject *result = enqueue(self, template, path, method, auth, status, fp, cap);
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
                PyObject *template, PyObject *path, PyObject *status, Capture *cap)
{
    PyObject *value = PyObject_CallMethod(request, "get", "O", key);
    if (value == NULL) {
        return NULL;
    }
    int truthy = PyObject_IsTrue(value);
    PyObject *result = NULL;
    if (truthy >= 0) {
        result = enqueue_reference(self, classify, request, template, path,
                                   truthy ? value : str_get, status, cap);
    }
    Py_DECREF(value);
    return result;
}

/* Whether an Authorization value of n bytes has the shape the fast path decides: a Bearer token
 * with no blank at either end, within MAX_VALUE (the token starts at a + 7). */
static int
plain_bearer(Recorder *self, const unsigned char *a, Py_ssize_t n)
{
    return n >= 8 && n <= MAX_VALUE && memcmp(a, "Bearer ", 7) == 0 && !self->blank[a[7]] &&
           !self->blank[a[n - 1]];
}

/* An ASGI request's record from what record_scope reads of its scope: its method (a str),
 * its headers and its query string (NULL: absent). scope: the request's scope, where the query
 * string is read when it is needed and which the reference classifies; or NULL for a kept
 * request (see keep_request), whose query string is given and which the reference classifies
 * as a dict of the two items it reads. cap: a measured request's (or NULL). */
static PyObject *
record_parts(Recorder *self, PyObject *scope, PyObject *method, PyObject *headers,
             PyObject *query, PyObject *template, PyObject *path, PyObject *status, Capture *cap)
{
    if (headers != NULL && !PyList_CheckExact(headers) && !PyTuple_CheckExact(headers)) {
        goto reference;
    }
    PyObject *authorization = NULL, *apikey = NULL, *cookie = NULL;
    Py_ssize_t count = headers == NULL ? 0 : PySequence_Fast_GET_SIZE(headers);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(headers, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) {
            goto reference;
        }
        /* Only the names are read here: the value of a header the classifier does not want is
         * never touched (nor is it by the reference), which saves a cache line per header. */
        PyObject *name = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(name)) {
            goto reference;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(name);
        const char *s = PyBytes_AS_STRING(name);
        if (n == 13 && memcmp(s, "authorization", 13) == 0) {
            if (!PyBytes_CheckExact(value)) {
                goto reference;
            }
            authorization = value;
        }
        else if (n == 6 && memcmp(s, "cookie", 6) == 0) {
            if (cookie != NULL || !PyBytes_CheckExact(value)) {
                goto reference; /* crumbs joined (or an odd value): the reference does it */
            }
            cookie = value;
        }
        else if ((self->apikey_lengths & length_bit(n)) &&
                 (apikey == NULL || PyBytes_GET_SIZE(apikey) == 0)) {
            /* (most headers have no API-key name's length: no names compared) */
            PyObject *names = self->apikey_raw;
            for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(names); k++) {
                PyObject *wanted = PyTuple_GET_ITEM(names, k);
                if (PyBytes_GET_SIZE(wanted) == n &&
                    memcmp(PyBytes_AS_STRING(wanted), s, n) == 0) {
                    if (!PyBytes_CheckExact(value)) {
                        goto reference;
                    }
                    apikey = value;
                    break;
                }
            }
        }
    }
    if (authorization != NULL && PyBytes_GET_SIZE(authorization) > 0) {
        const unsigned char *a = (const unsigned char *)PyBytes_AS_STRING(authorization);
        Py_ssize_t n = PyBytes_GET_SIZE(authorization);
        if (plain_bearer(self, a, n) && is_ascii(a + 7, n - 7)) {
            return enqueue_ascii(self, template, path, method, str_bearer, status,
                                 (const char *)a + 7, n - 7, cap);
        }
        goto reference;
    }
    if (apikey != NULL && PyBytes_GET_SIZE(apikey) > 0) {
        const unsigned char *a = (const unsigned char *)PyBytes_AS_STRING(apikey);
        Py_ssize_t n = PyBytes_GET_SIZE(apikey);
        if (n > MAX_VALUE || !is_ascii(a, n)) {
            goto reference;
        }
        return enqueue_ascii(self, template, path, method, str_apikey, status,
                             (const char *)a, n, cap);
    }
    if (scope != NULL) {
        query = PyDict_GetItemWithError(scope, key_query_string);
        if (query == NULL && PyErr_Occurred()) {
            return NULL;
        }
    }
    if (query != NULL && !PyBytes_CheckExact(query)) {
        goto reference;
    }
    if (query != NULL && PyBytes_GET_SIZE(query) > 0) {
        if (any_needle(self->query_needles, self->query_mode,
                       (const unsigned char *)PyBytes_AS_STRING(query), PyBytes_GET_SIZE(query))) {
            goto reference;
        }
    }
    if (cookie != NULL && PyBytes_GET_SIZE(cookie) > 0) {
        if (any_needle(self->cookie_needles, self->cookie_mode,
                       (const unsigned char *)PyBytes_AS_STRING(cookie), PyBytes_GET_SIZE(cookie))) {
            goto reference;
        }
    }
    return enqueue(self, template, path, method, str_anonymous, status, Py_NewRef(Py_None),
                   cap);

reference:
    if (scope != NULL) {
        return enqueue_reference(self, self->classify_scope, scope, template, path, method,
                                 status, cap);
    }
    /* A kept request: the reference reads only these two items of a scope. */
    PyObject *request = PyDict_New();
    if (request == NULL ||
        (headers != NULL && PyDict_SetItem(request, key_headers, headers) < 0) ||
        (query != NULL && PyDict_SetItem(request, key_query_string, query) < 0)) {
        Py_XDECREF(request);
        return NULL;
    }
    PyObject *result = enqueue_reference(self, self->classify_scope, request, template, path,
                                         method, status, cap);
    Py_DECREF(request);
    return result;
}

/* An ASGI request's record (see record_scope); cap: a measured request's (or NULL). */
static PyObject *
record_scope(Recorder *self, PyObject *scope, PyObject *template, PyObject *path,
             PyObject *status, Capture *cap)
{
    if (!PyDict_CheckExact(scope)) {
        return enqueue_generic(self, self->classify_scope, scope, key_method, template, path,
                               status, cap);
    }
    int other = 0;
    PyObject *method = method_of(scope, key_method, &other);
    if (method == NULL) {
        return NULL;
    }
    if (other) { /* not a str: the method as `scope.get("method") or "GET"` gives it */
        return enqueue_generic(self, self->classify_scope, scope, key_method, template, path,
                               status, cap);
    }
    PyObject *headers = PyDict_GetItemWithError(scope, key_headers);
    if (headers == NULL && PyErr_Occurred()) {
        return NULL;
    }
    return record_parts(self, scope, method, headers, NULL, template, path, status, cap);
}

/* Keeps an ordinary request for the batch: 1 when kept, 0 when it is to be recorded now (a
 * scope of unusual shape, which record_scope hands to the reference), -1 on error. The caller
 * runs flush_batch when the batch is full. */
static int
keep_request(Recorder *self, PyObject *scope, PyObject *template, PyObject *path,
             PyObject *status)
{
    int other = 0;
    PyObject *method = method_of(scope, key_method, &other);
    if (method == NULL) {
        return -1;
    }
    PyObject *headers = PyDict_GetItemWithError(scope, key_headers);
    if (headers == NULL && PyErr_Occurred()) {
        return -1;
    }
    PyObject *query = PyDict_GetItemWithError(scope, key_query_string);
    if (query == NULL && PyErr_Occurred()) {
        return -1;
    }
    /* (The look-ups above may have run Python code, a key's __eq__, and let another thread
     * fill the batch: its room is checked after them.) */
    if (other || self->batched >= self->batch_limit ||
        (headers != NULL && !PyList_CheckExact(headers) && !PyTuple_CheckExact(headers)) ||
        (query != NULL && !PyBytes_CheckExact(query))) {
        return 0;
    }
    /* No Python code runs from here to the end: no other thread sees a half-made entry. */
    Kept *k = &self->batch[self->batched++];
    k->template = Py_NewRef(template);
    k->path = Py_NewRef(path);
    k->method = Py_NewRef(method);
    k->headers = Py_XNewRef(headers);
    k->query = Py_XNewRef(query);
    k->status = Py_NewRef(status);
    return 1;
}

/* Records the kept requests, in a row: the recorder's code, its tally and its sketches are
 * then hot in the caches for all but the first (one request at a time, the application evicts
 * them in between). They are taken out of the batch first: classifying one may run Python
 * code, and another thread may keep requests meanwhile. A request that fails is not counted;
 * the others are, and the first failure is raised. -1 on error. */
static int
flush_batch(Recorder *self)
{
    int n = self->batched;
    if (n == 0) {
        return 0;
    }
    Kept kept[BATCH_SIZE];
    memcpy(kept, self->batch, sizeof(Kept) * (size_t)n);
    self->batched = 0;
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    for (int i = 0; i < n; i++) {
        Kept *k = &kept[i];
        PyObject *result = record_parts(self, NULL, k->method, k->headers, k->query,
                                        k->template, k->path, k->status, NULL);
        if (result != NULL) {
            Py_DECREF(result);
        }
        else if (type == NULL) {
            PyErr_Fetch(&type, &value, &traceback);
        }
        else {
            PyErr_Clear();
        }
    }
    release_kept(kept, n);
    if (type != NULL) {
        PyErr_Restore(type, value, traceback);
        return -1;
    }
    return 0;
}

/* record_scope(scope, template, path, status): an ASGI request. */
static PyObject *
Recorder_record_scope(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "record_scope() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    return record_scope(self, args[0], args[1], args[2], args[3], NULL);
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
/* A WSGI request's record (see record_environ); cap: a measured request's (or NULL). */
static PyObject *
record_environ(Recorder *self, PyObject *environ, PyObject *template, PyObject *path,
               PyObject *status, Capture *cap)
{
    if (!PyDict_CheckExact(environ)) {
        return enqueue_generic(self, self->classify_environ, environ, key_request_method,
                               template, path, status, cap);
    }
    int other = 0;
    PyObject *method = method_of(environ, key_request_method, &other);
    if (method == NULL) {
        return NULL;
    }
    if (other) {
        return enqueue_generic(self, self->classify_environ, environ, key_request_method,
                               template, path, status, cap);
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
            if (plain_bearer(self, a, n)) {
                return enqueue_ascii(self, template, path, method, str_bearer, status,
                                     (const char *)a + 7, n - 7, cap);
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
        return enqueue_ascii(self, template, path, method, str_apikey, status,
                             (const char *)a, n, cap);
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
        if (any_needle(self->query_needles, self->query_mode, a, n)) {
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
        if (any_needle(self->cookie_needles, self->cookie_mode, a, n)) {
            goto reference;
        }
    }
    return enqueue(self, template, path, method, str_anonymous, status, Py_NewRef(Py_None),
                   cap);

reference:
    return enqueue_reference(self, self->classify_environ, environ, template, path, method,
                             status, cap);
}

static PyObject *
Recorder_record_environ(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "record_environ() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    return record_environ(self, args[0], args[1], args[2], args[3], NULL);
}

/* The route template Starlette or FastAPI matched (memwatch.routes.starlette_template), as a new
 * reference in *template (NULL: none). Returns 1 when decided, 0 when the Python function must
 * decide (a mount prefix to normalise, unusual types), -1 on error. */
static int
starlette_template(Recorder *self, PyObject *scope, PyObject *entry_root_path,
                   PyObject **template)
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
    /* A route's `routes` and `path` are set when the app is built and never change after (in
     * Starlette and FastAPI): they are read once per route object and kept, for the last
     * ROUTE_MEMO route objects seen (by identity). */
    int slot = (int)(((uintptr_t)route >> 4) % ROUTE_MEMO);
    PyObject *path;
    if (self->route_memo[slot].route == route) {
        if (self->route_memo[slot].mount) {
            return 1; /* a Mount or Host: no endpoint matched */
        }
        path = Py_XNewRef(self->route_memo[slot].path);
    }
    else {
        PyObject *routes;
        int found = lookup_attr(route, key_routes, &routes);
        if (found < 0) {
            return -1;
        }
        Py_XDECREF(routes);
        path = NULL;
        if (!found && lookup_attr(route, key_path, &path) < 0) {
            return -1;
        }
        if (path != NULL && !PyUnicode_Check(path)) {
            Py_CLEAR(path); /* not a str: no template of its own */
        }
        Py_XSETREF(self->route_memo[slot].route, Py_NewRef(route));
        Py_XSETREF(self->route_memo[slot].path, Py_XNewRef(path));
        self->route_memo[slot].mount = found;
        if (found) {
            return 1; /* a Mount or Host: no endpoint matched */
        }
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

/* The end of an ASGI request on the fast path (StatusSend.finish), as ASGIMiddleware.finish
 * does it: the route template (memwatch's own key, else Starlette's matched route),
 * "__unmatched__" for a 404 without one when a framework routes (`unmatched`), else the raw
 * path; then record_scope. True when recorded; False when the request needs the Python path
 * (nothing is recorded then); NULL on error. */
static PyObject *
Recorder_finish_scope(Recorder *self, PyObject *scope, PyObject *status,
                      PyObject *entry_root_path, int unmatched, Capture *cap)
{
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
        int decided = starlette_template(self, scope, entry_root_path, &template);
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
    PyObject *result;
    int kept = 0;
    if (cap == NULL && self->counts != NULL) { /* an ordinary request in tally mode */
        kept = keep_request(self, scope, template, path, status);
    }
    if (kept < 0) {
        result = NULL;
    }
    else if (kept == 0) {
        result = record_scope(self, scope, template, path, status, cap);
    }
    else if (self->batched >= self->batch_limit && flush_batch(self) < 0) {
        result = NULL; /* the batch it filled: counted, but for the requests that failed */
    }
    else {
        result = Py_NewRef(Py_None);
    }
    Py_DECREF(template);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_TRUE;
}

/* flush(): counts the requests kept for a batch now (before a reading of the heap: kept
 * requests hold their headers, which would otherwise be freed between two readings). */
static PyObject *
Recorder_flush(Recorder *self, PyObject *Py_UNUSED(ignored))
{
    if (flush_batch(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Recorder_methods[] = {
    {"take", (PyCFunction)Recorder_take, METH_NOARGS,
     "take() -> (counts, noted, dropped): the tally since the last take (tally mode)."},
    {"flush", (PyCFunction)Recorder_flush, METH_NOARGS,
     "flush(): count the requests kept for a batch now (tally mode)."},
    {"record_scope", (PyCFunction)(void (*)(void))Recorder_record_scope, METH_FASTCALL,
     "record_scope(scope, template, path, status): queue an ASGI request's record."},
    {"record_environ", (PyCFunction)(void (*)(void))Recorder_record_environ, METH_FASTCALL,
     "record_environ(environ, template, path, status): queue a WSGI request's record."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
Recorder_get_batch_limit(Recorder *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->batch_limit);
}

static int
Recorder_set_batch_limit(Recorder *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "batch_limit cannot be deleted");
        return -1;
    }
    long limit = PyLong_AsLong(value);
    if (limit == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (limit < 0 || limit > BATCH_SIZE) {
        PyErr_Format(PyExc_ValueError, "batch_limit must be from 0 to %d", BATCH_SIZE);
        return -1;
    }
    self->batch_limit = (int)limit;
    return flush_batch(self); /* what is kept now may be over the new limit */
}

static PyGetSetDef Recorder_getset[] = {
    {"batch_limit", (getter)Recorder_get_batch_limit, (setter)Recorder_set_batch_limit,
     "Ordinary ASGI requests kept before they are counted together (0: each at its end).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
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
    .tp_getset = Recorder_getset,
};

/* --- the request gate ----------------------------------------------------------------------
 *
 * Gate numbers the requests as they enter and says when the monitor has work due
 * (memwatch.recorder.PyGate is the reference): due() takes the next number and returns it when
 * it has reached next_event, else None. The compiled middlewares read the fields directly. */

typedef struct {
    PyObject_HEAD
    long long next;        /* the next request's number */
    long long next_event;  /* the first number for which Monitor._event runs */
    char window_open;      /* a diagnosis window runs: requests take the Python path */
    char retired;          /* the monitor made a new gate (a reset): look it up again */
    PyObject *recorder;    /* Monitor.recorder (the monitor keeps it here) */
} Gate;

static PyTypeObject GateType;

static int
Gate_traverse(Gate *self, visitproc visit, void *arg)
{
    Py_VISIT(self->recorder);
    return 0;
}

static int
Gate_clear(Gate *self)
{
    Py_CLEAR(self->recorder);
    return 0;
}

static void
Gate_dealloc(Gate *self)
{
    PyObject_GC_UnTrack(self);
    Gate_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Gate_due(Gate *self, PyObject *Py_UNUSED(ignored))
{
    long long number = self->next++;
    if (number < self->next_event) {
        Py_RETURN_NONE;
    }
    return PyLong_FromLongLong(number);
}

static PyMethodDef Gate_methods[] = {
    {"due", (PyCFunction)Gate_due, METH_NOARGS,
     "due() -> int | None: the next request's number when the monitor has work due for it."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Gate_members[] = {
    {"next_event", T_LONGLONG, offsetof(Gate, next_event), 0,
     "The first request number for which the monitor's _event runs."},
    {"issued", T_LONGLONG, offsetof(Gate, next), READONLY, "Request numbers taken so far."},
    {"window_open", T_BOOL, offsetof(Gate, window_open), 0,
     "A diagnosis window runs (kept by Diagnosis): the compiled paths hand requests over."},
    {"retired", T_BOOL, offsetof(Gate, retired), 0,
     "The monitor replaced this gate: the middlewares that kept it look the new one up."},
    {"recorder", T_OBJECT, offsetof(Gate, recorder), 0,
     "The monitor's recorder (Monitor.recorder is kept here): read by the compiled paths."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject GateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.Gate",
    .tp_doc = "Request numbering and the due-event test (memwatch.recorder.PyGate in C).",
    .tp_basicsize = sizeof(Gate),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Gate_dealloc,
    .tp_traverse = (traverseproc)Gate_traverse,
    .tp_clear = (inquiry)Gate_clear,
    .tp_methods = Gate_methods,
    .tp_members = Gate_members,
};

/* --- the WSGI middleware's fast path ------------------------------------------------------
 *
 * WSGIBase is the compiled base of memwatch.wsgi.WSGIMiddleware. Its __call__ serves the common
 * request (not one of memwatch's own paths, nothing due at its entry, no diagnosis window) with
 * one WSGIResponse object that is at once the app's start_response (it keeps the status) and the
 * iterable handed back to the server (its close() forwards the app's close() once, then records
 * the request through the monitor's recorder). Every other request goes to the Python method
 * _respond(environ, start_response, entry), which does everything the pure-Python middleware
 * does. The app's exceptions propagate unchanged; memwatch's own failures are counted through
 * monitor.errors.record() and the request goes on.
 */

static PyObject *key_path_info, *key_file_wrapper, *key_gate, *key_due, *key_event;
static PyObject *key_diagnosis, *key_window, *key_recorder, *key_record_environ, *key_errors;
static PyObject *key_record, *key_respond, *str_500, *str_wsgi_entry, *str_wsgi_finish;
static PyObject *key_close, *key_call_python, *key_record_measured, *key_finish;
static PyObject *str_empty, *int_zero;

/* An instance's __dict__, kept between requests (see cached_attr); for a monitor, also its
 * compiled gate (see monitor_gate). */
typedef struct {
    PyObject *owner;
    PyObject *dict;
    Gate *gate;
} DictCache;

typedef struct {
    PyObject_HEAD
    PyObject *app;
    PyObject *monitor;
    PyObject *metrics_path;  /* str */
    PyObject *report_path;   /* str */
    int unmatched;           /* a framework routes: a 404 without a template is unmatched */
    int fast;                /* 0: every request through _respond (speedups off, or disabled) */
    DictCache monitor_dict;
    DictCache diagnosis_dict;
} WSGIBase;

typedef struct {
    PyObject_HEAD
    WSGIBase *owner;
    PyObject *environ;
    PyObject *start_response;
    PyObject *iterable;
    PyObject *iterator;
    PyObject *status;
    PyObject *entry;  /* a measured request's probe, else None */
    int closed;
} WSGIResponse;

static PyTypeObject WSGIResponseType;

/* Counts one of memwatch's own failures (the exception set now) and clears it. */
static void
count_error(PyObject *monitor, PyObject *where)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *errors = monitor == NULL ? NULL : PyObject_GetAttr(monitor, key_errors);
    if (errors != NULL) {
        PyObject *result = PyObject_CallMethodObjArgs(
            errors, key_record, where, value != NULL ? value : Py_None, NULL);
        Py_XDECREF(result);
        Py_DECREF(errors);
    }
    PyErr_Clear(); /* the counter itself failing must not break the request either */
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* An instance attribute, read from the instance's __dict__ (kept from the last call: the
 * monitor and its diagnosis are long-lived) without the type look-up of a generic getattr;
 * anything not in the dict (a class attribute, a property) through getattr. New reference. */
static PyObject *
cached_attr(DictCache *cache, PyObject *obj, PyObject *name)
{
    if (cache->owner != obj) {
        PyObject *dict = PyObject_GenericGetDict(obj, NULL);
        if (dict == NULL || !PyDict_CheckExact(dict)) {
            Py_XDECREF(dict);
            PyErr_Clear();
            return PyObject_GetAttr(obj, name);
        }
        Py_XSETREF(cache->dict, dict);
        Py_XSETREF(cache->owner, Py_NewRef(obj));
    }
    PyObject *value = PyDict_GetItemWithError(cache->dict, name);
    if (value != NULL) {
        return Py_NewRef(value);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyObject_GetAttr(obj, name);
}

/* Monitor._gate, new reference (NULL with an exception on failure). A compiled gate is kept
 * in the cache from one request to the next until the monitor retires it
 * (Monitor._reset_state makes a new one): no look-up per request. */
static PyObject *
monitor_gate(DictCache *monitor_dict, PyObject *monitor)
{
    Gate *kept = monitor_dict->gate;
    if (kept != NULL && !kept->retired) {
        return Py_NewRef(kept);
    }
    Py_CLEAR(monitor_dict->gate);
    PyObject *gate = cached_attr(monitor_dict, monitor, key_gate);
    if (gate != NULL && Py_TYPE(gate) == &GateType) {
        monitor_dict->gate = (Gate *)Py_NewRef(gate);
    }
    return gate;
}

/* Monitor.recorder, kept on its gate (read from the compiled gate directly). New reference;
 * NULL with an exception on failure. */
static PyObject *
monitor_recorder(DictCache *monitor_dict, PyObject *monitor)
{
    PyObject *gate = monitor_gate(monitor_dict, monitor);
    if (gate == NULL) {
        return NULL;
    }
    PyObject *recorder = Py_TYPE(gate) == &GateType && ((Gate *)gate)->recorder != NULL
                             ? Py_NewRef(((Gate *)gate)->recorder)
                             : PyObject_GetAttr(monitor, key_recorder);
    Py_DECREF(gate);
    return recorder;
}

static int
WSGIBase_traverse(WSGIBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->monitor);
    Py_VISIT(self->monitor_dict.owner);
    Py_VISIT(self->monitor_dict.dict);
    Py_VISIT(self->monitor_dict.gate);
    Py_VISIT(self->diagnosis_dict.owner);
    Py_VISIT(self->diagnosis_dict.dict);
    return 0; /* subtype_traverse visits a heap subclass's type itself */
}

static int
WSGIBase_clear(WSGIBase *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->monitor);
    Py_CLEAR(self->metrics_path);
    Py_CLEAR(self->report_path);
    Py_CLEAR(self->monitor_dict.owner);
    Py_CLEAR(self->monitor_dict.dict);
    Py_CLEAR(self->monitor_dict.gate);
    Py_CLEAR(self->diagnosis_dict.owner);
    Py_CLEAR(self->diagnosis_dict.dict);
    return 0;
}

static void
WSGIBase_dealloc(WSGIBase *self)
{
    PyObject_GC_UnTrack(self);
    WSGIBase_clear(self);
    /* A Python subclass's type reference is dropped by subtype_dealloc, not here. */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _wsgi_setup(metrics_path, report_path, unmatched, fast) */
static PyObject *
WSGIBase_setup(WSGIBase *self, PyObject *args)
{
    PyObject *metrics_path, *report_path;
    int unmatched, fast;
    if (!PyArg_ParseTuple(args, "OUpp", &metrics_path, &report_path, &unmatched, &fast)) {
        return NULL;
    }
    if (metrics_path != Py_None && !PyUnicode_Check(metrics_path)) {
        PyErr_SetString(PyExc_TypeError, "metrics_path must be a str or None");
        return NULL;
    }
    Py_XSETREF(self->metrics_path, Py_NewRef(metrics_path));
    Py_XSETREF(self->report_path, Py_NewRef(report_path));
    self->unmatched = unmatched;
    self->fast = fast;
    Py_RETURN_NONE;
}

/* Records a finished fast-path request; never raises. */
static void
response_finish(WSGIResponse *self)
{
    if (self->closed) {
        return;
    }
    self->closed = 1;
    WSGIBase *owner = self->owner;
    PyObject *environ = self->environ;
    PyObject *status = self->status != NULL ? self->status : Py_None;
    PyObject *template = NULL, *path = Py_None, *recorder = NULL, *result = NULL;
    if (environ == NULL || owner == NULL || owner->monitor == NULL) {
        goto done;
    }
    template = PyDict_GetItemWithError(environ, key_route_key);
    if (template == NULL && PyErr_Occurred()) {
        goto failed;
    }
    if (template == NULL || template == Py_None) {
        template = Py_None;
        int is_404 = 0;
        if (owner->unmatched && PyUnicode_Check(status) && PyUnicode_GET_LENGTH(status) >= 3) {
            PyObject *head = PyUnicode_Substring(status, 0, 3);
            if (head == NULL) {
                goto failed;
            }
            is_404 = PyUnicode_CompareWithASCIIString(head, "404") == 0;
            Py_DECREF(head);
        }
        if (is_404) {
            template = str_unmatched;
        }
        else {
            path = PyDict_GetItemWithError(environ, key_path_info);
            if (path == NULL && PyErr_Occurred()) {
                goto failed;
            }
            if (path == NULL) {
                path = str_root;
            }
            else {
                int truthy = PyObject_IsTrue(path);
                if (truthy < 0) {
                    goto failed;
                }
                if (!truthy) {
                    path = str_root;
                }
            }
        }
    }
    recorder = monitor_recorder(&owner->monitor_dict, owner->monitor);
    if (recorder == NULL) {
        goto failed;
    }
    PyObject *args[4] = {environ, template, path, status};
    PyObject *entry = self->entry != NULL ? self->entry : Py_None;
    if (entry != Py_None) {
        /* A measured request: its record goes to Monitor.record_measured with its probe. */
        Capture capture = {PyObject_GetAttr(owner->monitor, key_record_measured), entry};
        if (capture.record_measured == NULL) {
            goto failed;
        }
        if (Py_TYPE(recorder) == &RecorderType) {
            result = record_environ((Recorder *)recorder, environ, template, path, status,
                                    &capture);
        }
        else { /* the Python recorder: the middleware's finish() does it */
            PyObject *finish = PyObject_GetAttr((PyObject *)owner, key_finish);
            if (finish != NULL) {
                PyObject *finish_args[3] = {environ, status, entry};
                result = PyObject_Vectorcall(finish, finish_args, 3, NULL);
                Py_DECREF(finish);
            }
        }
        Py_DECREF(capture.record_measured);
    }
    else if (Py_TYPE(recorder) == &RecorderType) {
        result = Recorder_record_environ((Recorder *)recorder, args, 4);
    }
    else {
        PyObject *method = PyObject_GetAttr(recorder, key_record_environ);
        if (method != NULL) {
            result = PyObject_Vectorcall(method, args, 4, NULL);
            Py_DECREF(method);
        }
    }
    if (result == NULL) {
        goto failed;
    }
    goto done;
failed:
    count_error(owner != NULL ? owner->monitor : NULL, str_wsgi_finish);
done:
    Py_XDECREF(result);
    Py_XDECREF(recorder);
    /* Nothing of the request stays reachable from here (servers keep the response in closures
     * that start_response captures): no cycle can form through memwatch. */
    Py_CLEAR(self->environ);
    Py_CLEAR(self->iterable);
    Py_CLEAR(self->iterator);
    Py_CLEAR(self->start_response);
    Py_CLEAR(self->entry);
}

static int
WSGIResponse_traverse(WSGIResponse *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->environ);
    Py_VISIT(self->start_response);
    Py_VISIT(self->iterable);
    Py_VISIT(self->iterator);
    Py_VISIT(self->status);
    Py_VISIT(self->entry);
    return 0;
}

static int
WSGIResponse_clear(WSGIResponse *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->environ);
    Py_CLEAR(self->start_response);
    Py_CLEAR(self->iterable);
    Py_CLEAR(self->iterator);
    Py_CLEAR(self->status);
    Py_CLEAR(self->entry);
    return 0;
}

static void
WSGIResponse_dealloc(WSGIResponse *self)
{
    PyObject_GC_UnTrack(self);
    WSGIResponse_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The app's start_response(status, headers, exc_info=None): keeps the status, calls the
 * server's. */
static PyObject *
WSGIResponse_call(WSGIResponse *self, PyObject *args, PyObject *kwargs)
{
    if (self->start_response == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "start_response called after the response was closed");
        return NULL;
    }
    if (PyTuple_GET_SIZE(args) >= 1) {
        Py_XSETREF(self->status, Py_NewRef(PyTuple_GET_ITEM(args, 0)));
    }
    else if (kwargs != NULL) {
        PyObject *status = PyDict_GetItemString(kwargs, "status");
        if (status != NULL) {
            Py_XSETREF(self->status, Py_NewRef(status));
        }
    }
    PyObject *start_response = Py_NewRef(self->start_response);
    PyObject *result = PyObject_Call(start_response, args, kwargs);
    Py_DECREF(start_response);
    return result;
}

static PyObject *
WSGIResponse_iter(WSGIResponse *self)
{
    if (self->iterator == NULL && self->iterable != NULL) {
        self->iterator = PyObject_GetIter(self->iterable);
        if (self->iterator == NULL) {
            return NULL;
        }
    }
    return Py_NewRef(self);
}

/* The app's body, chunk by chunk, untouched; a body that fails half-way makes the request a
 * server error (it was a 200 at start_response), as on ASGI. */
static PyObject *
WSGIResponse_next(WSGIResponse *self)
{
    if (self->iterator == NULL) {
        if (self->iterable == NULL) {
            return NULL; /* closed: exhausted */
        }
        self->iterator = PyObject_GetIter(self->iterable);
        if (self->iterator == NULL) {
            return NULL;
        }
    }
    PyObject *item = (*Py_TYPE(self->iterator)->tp_iternext)(self->iterator);
    if (item == NULL && PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_StopIteration) &&
        PyErr_ExceptionMatches(PyExc_Exception)) {
        Py_XSETREF(self->status, Py_NewRef(str_500));
    }
    return item;
}

/* close(): the app's close() exactly once, then the request is recorded (also when the app's
 * close() raises: its exception propagates after). */
static PyObject *
WSGIResponse_close(WSGIResponse *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed) {
        Py_RETURN_NONE;
    }
    PyObject *failed_type = NULL, *failed_value = NULL, *failed_tb = NULL;
    if (self->iterable != NULL) {
        PyObject *close;
        PyObject *iterable = Py_NewRef(self->iterable);
        int found = lookup_attr(iterable, key_close, &close);
        Py_DECREF(iterable);
        if (found > 0) {
            PyObject *result = PyObject_CallNoArgs(close);
            Py_DECREF(close);
            Py_XDECREF(result);
        }
        if (PyErr_Occurred()) {
            PyErr_Fetch(&failed_type, &failed_value, &failed_tb);
        }
    }
    response_finish(self);
    if (failed_type != NULL) {
        PyErr_Restore(failed_type, failed_value, failed_tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef WSGIResponse_methods[] = {
    {"close", (PyCFunction)WSGIResponse_close, METH_NOARGS,
     "Close the app's iterable (once) and record the request."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WSGIResponseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.WSGIResponse",
    .tp_doc = "The app's response iterable, passed through untouched; also its start_response.",
    .tp_basicsize = sizeof(WSGIResponse),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)WSGIResponse_dealloc,
    .tp_traverse = (traverseproc)WSGIResponse_traverse,
    .tp_clear = (inquiry)WSGIResponse_clear,
    .tp_call = (ternaryfunc)WSGIResponse_call,
    .tp_iter = (getiterfunc)WSGIResponse_iter,
    .tp_iternext = (iternextfunc)WSGIResponse_next,
    .tp_methods = WSGIResponse_methods,
};

/* Whether a request is for one of memwatch's own paths (Endpoints.handles), from the path
 * under `key` in its environ or scope: 1 yes (or a path of an unusual type: the Python path
 * decides), 0 no, -1 error. */
/* Whether str `text` starts with str `prefix` (and, with `whole`, is equal to it): 1 yes, 0 no,
 * -1 error. One memcmp when both are stored with the same character width, as a path and
 * memwatch's own paths nearly always are (PyUnicode_Tailmatch's general code is cold at every
 * request). */
static int
str_starts(PyObject *text, PyObject *prefix, int whole)
{
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(text) < 0 || PyUnicode_READY(prefix) < 0) {
        return -1;
    }
#endif
    Py_ssize_t n = PyUnicode_GET_LENGTH(prefix);
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    if (length < n || (whole && length != n)) {
        return 0;
    }
    int kind = PyUnicode_KIND(prefix);
    if (PyUnicode_KIND(text) == kind) {
        return memcmp(PyUnicode_DATA(text), PyUnicode_DATA(prefix), (size_t)n * (size_t)kind) == 0;
    }
    return (int)PyUnicode_Tailmatch(text, prefix, 0, n, -1);
}

static int
is_own_path(PyObject *mapping, PyObject *key, PyObject *metrics_path, PyObject *report_path)
{
    PyObject *path = PyDict_GetItemWithError(mapping, key);
    if (path == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        path = str_root;
    }
    if (!PyUnicode_CheckExact(path)) {
        return 1;
    }
    if (PyUnicode_GET_LENGTH(path) == 0) {
        path = str_root;
    }
    if (metrics_path != Py_None) {
        int same = str_starts(path, metrics_path, 1);
        if (same != 0) {
            return same;
        }
    }
    return str_starts(path, report_path, 0);
}

/* Monitor.request_entry() for a request the compiled path may serve: the request is numbered
 * and whatever is due at its number runs (a drain, a sample, a measured request's probe).
 * Returns a new reference: None when nothing is due for the request itself, the probe of a
 * measured request; NULL without an exception when the request must take the Python path
 * (a diagnosis window is open: the Python path tags the request and numbers it itself).
 * memwatch's own failures are counted under `where`; the request goes on. */
static PyObject *
enter_request(PyObject *monitor, DictCache *monitor_dict, DictCache *diagnosis_dict,
              PyObject *where)
{
    PyObject *gate = monitor_gate(monitor_dict, monitor);
    if (gate == NULL) {
        count_error(monitor, where); /* counted (and cleared) before any other look-up */
    }
    int in_window;
    if (gate != NULL && Py_TYPE(gate) == &GateType) {
        in_window = ((Gate *)gate)->window_open; /* kept by Diagnosis: no look-up */
    }
    else { /* the Python gate: the diagnosis's window itself */
        PyObject *diagnosis = cached_attr(monitor_dict, monitor, key_diagnosis);
        PyObject *window =
            diagnosis == NULL ? NULL : cached_attr(diagnosis_dict, diagnosis, key_window);
        Py_XDECREF(diagnosis);
        if (window == NULL) {
            Py_XDECREF(gate);
            count_error(monitor, where);
            return NULL;
        }
        in_window = window != Py_None;
        Py_DECREF(window);
    }
    if (in_window) {
        Py_XDECREF(gate);
        return NULL;
    }
    PyObject *entry = Py_NewRef(Py_None);
    PyObject *ticket = NULL;
    int due = gate == NULL ? 0 : -1; /* no gate: counted above, the request not numbered */
    if (gate != NULL && Py_TYPE(gate) == &GateType) {
        Gate *g = (Gate *)gate;
        long long number = g->next++;
        due = number >= g->next_event;
        if (due) {
            ticket = PyLong_FromLongLong(number);
            due = ticket == NULL ? -1 : 1;
        }
    }
    else if (gate != NULL) { /* the Python gate (a test's, say) */
        ticket = PyObject_CallMethodNoArgs(gate, key_due);
        due = ticket == NULL ? -1 : ticket != Py_None;
    }
    Py_XDECREF(gate);
    if (due > 0) {
        PyObject *probe = PyObject_CallMethodOneArg(monitor, key_event, ticket);
        if (probe == NULL) {
            count_error(monitor, where);
        }
        else {
            Py_SETREF(entry, probe);
        }
    }
    else if (due < 0) {
        count_error(monitor, where);
    }
    Py_XDECREF(ticket);
    return entry;
}

/* The Python path: self._call_python(environ, start_response) for the whole request (entry
 * NULL), or self._respond(environ, start_response, entry) once the entry is known. */
static PyObject *
respond_python(WSGIBase *self, PyObject *environ, PyObject *start_response, PyObject *entry)
{
    PyObject *args[4] = {(PyObject *)self, environ, start_response, entry};
    if (entry == NULL) {
        return PyObject_VectorcallMethod(key_call_python, args,
                                         3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    return PyObject_VectorcallMethod(key_respond, args, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

static PyObject *
WSGIBase_call(WSGIBase *self, PyObject *args, PyObject *kwargs)
{
    PyObject *environ, *start_response;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "a WSGI application takes (environ, start_response)");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "__call__", 2, 2, &environ, &start_response)) {
        return NULL;
    }
    if (!self->fast || self->monitor == NULL || self->app == NULL ||
        self->metrics_path == NULL || !PyDict_CheckExact(environ)) {
        return respond_python(self, environ, start_response, NULL);
    }
    int own = is_own_path(environ, key_path_info, self->metrics_path, self->report_path);
    if (own != 0) {
        if (own < 0) {
            PyErr_Clear();
        }
        return respond_python(self, environ, start_response, NULL);
    }
    PyObject *entry =
        enter_request(self->monitor, &self->monitor_dict, &self->diagnosis_dict, str_wsgi_entry);
    if (entry == NULL) { /* a diagnosis window: the whole request in Python */
        return respond_python(self, environ, start_response, NULL);
    }
    if (entry != Py_None) {
        /* A measured request: compiled too when the recorder is (its record then goes to
         * Monitor.record_measured with the probe); else from its entry on in Python. */
        PyObject *recorder = monitor_recorder(&self->monitor_dict, self->monitor);
        int compiled = recorder != NULL && Py_TYPE(recorder) == &RecorderType;
        if (recorder == NULL) {
            PyErr_Clear();
        }
        Py_XDECREF(recorder);
        if (!compiled) {
            PyObject *result = respond_python(self, environ, start_response, entry);
            Py_DECREF(entry);
            return result;
        }
    }
    WSGIResponse *response = PyObject_GC_New(WSGIResponse, &WSGIResponseType);
    if (response == NULL) {
        Py_DECREF(entry);
        return NULL;
    }
    response->entry = entry; /* the reference is the response's now */
    response->owner = (WSGIBase *)Py_NewRef(self);
    response->environ = Py_NewRef(environ);
    response->start_response = Py_NewRef(start_response);
    response->iterable = NULL;
    response->iterator = NULL;
    response->status = NULL;
    response->closed = 0;
    PyObject_GC_Track(response);
    PyObject *app = Py_NewRef(self->app);
    PyObject *call_args[2] = {environ, (PyObject *)response};
    PyObject *result = PyObject_Vectorcall(app, call_args, 2, NULL);
    Py_DECREF(app);
    if (result == NULL) {
        /* The app's exception: the request counts as a server error, then it propagates. */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        Py_XSETREF(response->status, Py_NewRef(str_500));
        response_finish(response);
        Py_DECREF(response);
        PyErr_Restore(type, value, traceback);
        return NULL;
    }
    PyObject *file_wrapper = PyDict_GetItemWithError(environ, key_file_wrapper);
    if (file_wrapper == NULL && PyErr_Occurred()) {
        count_error(self->monitor, str_wsgi_finish);
    }
    else if (file_wrapper != NULL && PyType_Check(file_wrapper)) {
        int is_file = PyObject_IsInstance(result, file_wrapper);
        if (is_file < 0) {
            count_error(self->monitor, str_wsgi_finish);
        }
        else if (is_file) {
            /* Keep the server's zero-copy path (sendfile): count the request now. */
            response_finish(response);
            Py_DECREF(response);
            return result;
        }
    }
    response->iterable = result; /* the reference is the response's now */
    return (PyObject *)response;
}

static PyMethodDef WSGIBase_methods[] = {
    {"_wsgi_setup", (PyCFunction)WSGIBase_setup, METH_VARARGS,
     "_wsgi_setup(metrics_path, report_path, unmatched, fast): set up the compiled path."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef WSGIBase_members[] = {
    {"app", T_OBJECT, offsetof(WSGIBase, app), 0, "The wrapped WSGI application."},
    {"monitor", T_OBJECT, offsetof(WSGIBase, monitor), 0, "The monitor requests go to."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject WSGIBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.WSGIBase",
    .tp_doc = "Compiled base of memwatch.wsgi.WSGIMiddleware (its fast path).",
    .tp_basicsize = sizeof(WSGIBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)WSGIBase_dealloc,
    .tp_traverse = (traverseproc)WSGIBase_traverse,
    .tp_clear = (inquiry)WSGIBase_clear,
    .tp_call = (ternaryfunc)WSGIBase_call,
    .tp_methods = WSGIBase_methods,
    .tp_members = WSGIBase_members,
};

/* --- the ASGI middleware's fast path ------------------------------------------------------
 *
 * ASGIFast.enter(scope, send) starts a common HTTP request (not one of memwatch's own paths, no
 * diagnosis window): it numbers the request (and runs what is due at it, as
 * Monitor.request_entry does) and returns a StatusSend, the send callable handed to the app,
 * which keeps the response's status. StatusSend.finish() ends the request: the recorder's
 * finish_scope, or the middleware's Python finish() for a measured request or a case the
 * recorder hands back. None from enter() means: serve this request in Python.
 */

static PyObject *key_type, *key_status, *str_http, *str_response_start, *str_asgi_entry;
static PyObject *str_asgi_finish, *int_500;

typedef struct {
    PyObject_HEAD
    PyObject *monitor;
    PyObject *metrics_path;   /* str or None */
    PyObject *report_path;    /* str */
    PyObject *finish_python;  /* the middleware's finish(scope, status, entry, root_path) */
    int unmatched;
    int fast;
    DictCache monitor_dict;
    DictCache diagnosis_dict;
} ASGIFast;

typedef struct {
    PyObject_HEAD
    ASGIFast *owner;
    PyObject *send;
    PyObject *scope;
    PyObject *root_path;
    PyObject *entry;
    PyObject *status;
    vectorcallfunc vectorcall;
} StatusSend;

static PyTypeObject StatusSendType;

static int
ASGIFast_traverse(ASGIFast *self, visitproc visit, void *arg)
{
    Py_VISIT(self->monitor);
    Py_VISIT(self->finish_python);
    Py_VISIT(self->monitor_dict.owner);
    Py_VISIT(self->monitor_dict.dict);
    Py_VISIT(self->monitor_dict.gate);
    Py_VISIT(self->diagnosis_dict.owner);
    Py_VISIT(self->diagnosis_dict.dict);
    return 0;
}

static int
ASGIFast_clear(ASGIFast *self)
{
    Py_CLEAR(self->monitor);
    Py_CLEAR(self->metrics_path);
    Py_CLEAR(self->report_path);
    Py_CLEAR(self->finish_python);
    Py_CLEAR(self->monitor_dict.owner);
    Py_CLEAR(self->monitor_dict.dict);
    Py_CLEAR(self->monitor_dict.gate);
    Py_CLEAR(self->diagnosis_dict.owner);
    Py_CLEAR(self->diagnosis_dict.dict);
    return 0;
}

static void
ASGIFast_dealloc(ASGIFast *self)
{
    PyObject_GC_UnTrack(self);
    ASGIFast_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
ASGIFast_init(ASGIFast *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"monitor", "metrics_path", "report_path", "finish", "unmatched",
                             "fast", NULL};
    PyObject *monitor, *metrics_path, *report_path, *finish;
    int unmatched, fast;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOUOpp", kwlist, &monitor, &metrics_path,
                                     &report_path, &finish, &unmatched, &fast)) {
        return -1;
    }
    if (metrics_path != Py_None && !PyUnicode_Check(metrics_path)) {
        PyErr_SetString(PyExc_TypeError, "metrics_path must be a str or None");
        return -1;
    }
    Py_XSETREF(self->monitor, Py_NewRef(monitor));
    Py_XSETREF(self->metrics_path, Py_NewRef(metrics_path));
    Py_XSETREF(self->report_path, Py_NewRef(report_path));
    Py_XSETREF(self->finish_python, Py_NewRef(finish));
    self->unmatched = unmatched;
    self->fast = fast;
    return 0;
}

static PyObject *StatusSend_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                       PyObject *kwnames);

/* enter(scope, send) -> StatusSend | None; never raises (memwatch's failures are counted). */
static PyObject *
ASGIFast_enter(ASGIFast *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "enter() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *scope = args[0], *send = args[1];
    if (!self->fast || self->monitor == NULL || !PyDict_CheckExact(scope)) {
        Py_RETURN_NONE;
    }
    PyObject *monitor = self->monitor;
    PyObject *type = PyDict_GetItemWithError(scope, key_type);
    if (type == NULL || !PyUnicode_CheckExact(type) ||
        (type != str_http && PyUnicode_Compare(type, str_http) != 0)) {
        PyErr_Clear();
        Py_RETURN_NONE; /* lifespan, websocket, anything odd: straight through in Python */
    }
    int own = is_own_path(scope, key_path, self->metrics_path, self->report_path);
    if (own != 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *entry =
        enter_request(monitor, &self->monitor_dict, &self->diagnosis_dict, str_asgi_entry);
    if (entry == NULL) {
        Py_RETURN_NONE; /* a diagnosis window: the Python path tags the request */
    }
    PyObject *root_path = PyDict_GetItemWithError(scope, key_root_path);
    if (root_path == NULL) {
        PyErr_Clear();
        root_path = str_empty;
    }
    else if (!(PyUnicode_CheckExact(root_path) && PyUnicode_GET_LENGTH(root_path) > 0)) {
        int truthy = PyObject_IsTrue(root_path); /* ("" is the common case: no call) */
        if (truthy <= 0) {
            PyErr_Clear();
            root_path = str_empty;
        }
    }
    StatusSend *sender = PyObject_GC_New(StatusSend, &StatusSendType);
    if (sender == NULL) {
        Py_DECREF(entry);
        count_error(monitor, str_asgi_entry);
        Py_RETURN_NONE;
    }
    sender->owner = (ASGIFast *)Py_NewRef(self);
    sender->send = Py_NewRef(send);
    sender->scope = Py_NewRef(scope);
    sender->root_path = Py_NewRef(root_path);
    sender->entry = entry;
    sender->status = Py_NewRef(int_zero);
    sender->vectorcall = StatusSend_vectorcall;
    PyObject_GC_Track(sender);
    return (PyObject *)sender;
}

static PyMethodDef ASGIFast_methods[] = {
    {"enter", (PyCFunction)(void (*)(void))ASGIFast_enter, METH_FASTCALL,
     "enter(scope, send) -> StatusSend | None: start a request on the fast path."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ASGIFastType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.ASGIFast",
    .tp_doc = "The compiled fast path of memwatch.asgi.ASGIMiddleware.",
    .tp_basicsize = sizeof(ASGIFast),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ASGIFast_init,
    .tp_dealloc = (destructor)ASGIFast_dealloc,
    .tp_traverse = (traverseproc)ASGIFast_traverse,
    .tp_clear = (inquiry)ASGIFast_clear,
    .tp_methods = ASGIFast_methods,
};

static int
StatusSend_traverse(StatusSend *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->send);
    Py_VISIT(self->scope);
    Py_VISIT(self->entry);
    Py_VISIT(self->status);
    return 0;
}

static int
StatusSend_clear(StatusSend *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->send);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->root_path);
    Py_CLEAR(self->entry);
    Py_CLEAR(self->status);
    return 0;
}

static void
StatusSend_dealloc(StatusSend *self)
{
    PyObject_GC_UnTrack(self);
    StatusSend_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* message[key] as the app's own subscript gives it (KeyError when missing): a plain dict's
 * item without the mapping protocol's detour, anything else through it. New reference. */
static PyObject *
message_item(PyObject *message, PyObject *key)
{
    if (!PyDict_CheckExact(message)) {
        return PyObject_GetItem(message, key);
    }
    PyObject *value = PyDict_GetItemWithError(message, key);
    if (value == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_KeyError, key);
        }
        return NULL;
    }
    return Py_NewRef(value);
}

/* send(message): keeps the status of http.response.start, returns the server's awaitable. */
static PyObject *
StatusSend_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                      PyObject *kwnames)
{
    StatusSend *self = (StatusSend *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "send() takes one message");
        return NULL;
    }
    if (self->send == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "send() called after the request finished");
        return NULL;
    }
    PyObject *message = args[0];
    PyObject *type = message_item(message, key_type); /* message["type"], as the app's */
    if (type == NULL) {
        return NULL;
    }
    int start = type == str_response_start;
    if (!start && PyUnicode_CheckExact(type) && PyUnicode_CHECK_INTERNED(type)) {
        start = 0; /* interned and not the interned "http.response.start": another string */
    }
    else if (!start && PyUnicode_Check(type)) {
        start = PyUnicode_Compare(type, str_response_start) == 0;
    }
    else if (!start) {
        start = PyObject_RichCompareBool(type, str_response_start, Py_EQ);
        if (start < 0) {
            Py_DECREF(type);
            return NULL;
        }
    }
    Py_DECREF(type);
    if (start) {
        PyObject *status = message_item(message, key_status);
        if (status == NULL) {
            return NULL;
        }
        Py_XSETREF(self->status, status);
    }
    PyObject *send = Py_NewRef(self->send);
    PyObject *result = PyObject_Vectorcall(send, args, 1, NULL);
    Py_DECREF(send);
    return result;
}

static PyObject *
StatusSend_failed(StatusSend *self, PyObject *Py_UNUSED(ignored))
{
    Py_XSETREF(self->status, Py_NewRef(int_500));
    Py_RETURN_NONE;
}

/* finish(): records the request (once); never raises. */
static PyObject *
StatusSend_finish(StatusSend *self, PyObject *Py_UNUSED(ignored))
{
    ASGIFast *owner = self->owner;
    PyObject *scope = self->scope;
    if (owner == NULL || scope == NULL) {
        Py_RETURN_NONE;
    }
    self->scope = NULL; /* finished: the reference is dropped below */
    PyObject *status = self->status;
    int truthy = PyObject_IsTrue(status);
    if (truthy < 0) {
        PyErr_Clear();
        truthy = 0;
    }
    if (!truthy) {
        status = int_500;
    }
    Py_INCREF(status);
    PyObject *result = NULL;
    PyObject *recorder = monitor_recorder(&owner->monitor_dict, owner->monitor);
    if (recorder != NULL && Py_TYPE(recorder) == &RecorderType) {
        /* The compiled recorder: the route template and the record, here; a measured
         * request's record goes to Monitor.record_measured with its probe. */
        Capture capture = {NULL, self->entry};
        if (self->entry == Py_None ||
            (capture.record_measured = PyObject_GetAttr(owner->monitor,
                                                        key_record_measured)) != NULL) {
            result = Recorder_finish_scope((Recorder *)recorder, scope, status,
                                           self->root_path, owner->unmatched,
                                           self->entry == Py_None ? NULL : &capture);
        }
        Py_XDECREF(capture.record_measured);
    }
    if (result == Py_False || (result == NULL && !PyErr_Occurred())) {
        /* A measured request, another recorder, or a case the compiled one hands back:
         * the middleware's finish() in Python. */
        Py_CLEAR(result);
        PyObject *args[4] = {scope, status, self->entry, self->root_path};
        result = PyObject_Vectorcall(owner->finish_python, args, 4, NULL);
    }
    Py_XDECREF(recorder);
    if (result == NULL) {
        count_error(owner->monitor, str_asgi_finish);
    }
    Py_XDECREF(result);
    Py_DECREF(status);
    Py_DECREF(scope);
    /* send stays: an app that sends after returning reaches the server as it would bare. */
    Py_CLEAR(self->entry);
    Py_RETURN_NONE;
}

static PyMethodDef StatusSend_methods[] = {
    {"failed", (PyCFunction)StatusSend_failed, METH_NOARGS,
     "The app raised: the request is a server error."},
    {"finish", (PyCFunction)StatusSend_finish, METH_NOARGS, "Record the request (once)."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
StatusSend_get_status(StatusSend *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->status);
}

static PyGetSetDef StatusSend_getset[] = {
    {"status", (getter)StatusSend_get_status, NULL, "The status sent so far (0: none).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StatusSendType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.StatusSend",
    .tp_doc = "The send callable handed to the app: keeps the response's status.",
    .tp_basicsize = sizeof(StatusSend),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(StatusSend, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = (destructor)StatusSend_dealloc,
    .tp_traverse = (traverseproc)StatusSend_traverse,
    .tp_clear = (inquiry)StatusSend_clear,
    .tp_methods = StatusSend_methods,
    .tp_getset = StatusSend_getset,
};

/* --- ASGIMiddleware.__call__, stepped in C ---------------------------------------------------
 *
 * AsyncCall is the class attribute ASGIMiddleware.__call__ when this module is built: a method
 * descriptor that carries the Python coroutine function it stands for (its __code__, __name__,
 * __defaults__, ..., copied in Python, so that inspect and asyncio see a coroutine function, as
 * servers check) and calls it for anything but the common case. The common case, a middleware
 * (an ASGIBase, below) whose `_fast` slot holds a compiled ASGIFast, gets an ASGICall: an
 * awaitable that does what the Python coroutine does, without its frame:
 *
 *     sender = fast.enter(scope, send)                   # at the first step, as the coroutine
 *     if sender is None: await self._call_python(scope, receive, send); return
 *     try: await self.app(scope, receive, sender)
 *     except Exception: sender.failed(); raise
 *     finally: sender.finish()
 *
 * ASGICall follows the coroutine protocol (am_send, send, throw, close, a finaliser that closes
 * a started call and warns about one never awaited) and returns None, as the coroutine does.
 */

static PyObject *key_throw;

typedef struct {
    PyObject_HEAD
    PyObject *func;  /* the Python coroutine function: the reference and the fallback */
    PyObject *dict;  /* __code__, __name__, __wrapped__, ...: set in Python */
    vectorcallfunc vectorcall;
} AsyncCall;

enum { CALL_CREATED, CALL_STARTED, CALL_FINISHED };

typedef struct {
    PyObject_HEAD
    PyObject *middleware;
    PyObject *fast;     /* the middleware's ASGIFast */
    PyObject *app;
    PyObject *scope;
    PyObject *receive;
    PyObject *send;
    PyObject *inner;    /* what is awaited (an iterator), once started */
    PyObject *sender;   /* the StatusSend of the fast path; NULL on the Python path */
    char state;
    char running;
} ASGICall;

static PyTypeObject ASGICallType;

static int
ASGICall_traverse(ASGICall *self, visitproc visit, void *arg)
{
    Py_VISIT(self->middleware);
    Py_VISIT(self->fast);
    Py_VISIT(self->app);
    Py_VISIT(self->scope);
    Py_VISIT(self->receive);
    Py_VISIT(self->send);
    Py_VISIT(self->inner);
    Py_VISIT(self->sender);
    return 0;
}

/* Drops what only the start needs. */
static void
ASGICall_drop_arguments(ASGICall *self)
{
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->fast);
    Py_CLEAR(self->app);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->receive);
    Py_CLEAR(self->send);
}

static int
ASGICall_clear(ASGICall *self)
{
    ASGICall_drop_arguments(self);
    Py_CLEAR(self->inner);
    Py_CLEAR(self->sender);
    return 0;
}

static void
ASGICall_finalize(ASGICall *self);

static void
ASGICall_dealloc(ASGICall *self)
{
    if (self->state != CALL_FINISHED &&
        PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    ASGICall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The request is over (the exception set now, if any, is how it ended): the coroutine's
 * `except Exception: sender.failed()` and `finally: sender.finish()`. Keeps the exception. */
static void
ASGICall_end(ASGICall *self)
{
    self->state = CALL_FINISHED;
    PyObject *sender = self->sender;
    self->sender = NULL;
    Py_CLEAR(self->inner);
    ASGICall_drop_arguments(self);
    if (sender == NULL) {
        return;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (type != NULL && PyErr_GivenExceptionMatches(type, PyExc_Exception)) {
        Py_XDECREF(StatusSend_failed((StatusSend *)sender, NULL));
    }
    PyObject *done = StatusSend_finish((StatusSend *)sender, NULL);
    if (done == NULL) {
        PyErr_Clear(); /* finish() never raises; should it, the app's outcome still wins */
    }
    Py_XDECREF(done);
    Py_DECREF(sender);
    PyErr_Restore(type, value, traceback);
}

/* The iterator `await aw` drives, as the interpreter gets it (_PyCoro_GetAwaitableIter). */
static PyObject *
awaitable_iter(PyObject *aw)
{
    if (PyCoro_CheckExact(aw)) {
        return Py_NewRef(aw);
    }
    PyTypeObject *type = Py_TYPE(aw);
    unaryfunc getter = type->tp_as_async != NULL ? type->tp_as_async->am_await : NULL;
    if (getter == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     type->tp_name);
        return NULL;
    }
    PyObject *iter = getter(aw);
    if (iter == NULL) {
        return NULL;
    }
    if (PyCoro_CheckExact(iter)) {
        PyErr_SetString(PyExc_TypeError, "__await__() returned a coroutine");
        Py_DECREF(iter);
        return NULL;
    }
    if (!PyIter_Check(iter)) {
        PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                     Py_TYPE(iter)->tp_name);
        Py_DECREF(iter);
        return NULL;
    }
    return iter;
}

/* The first step: the request enters; what is awaited is the app's call (fast path) or the
 * middleware's _call_python (everything else). -1 with an exception: the call is over. */
static int
ASGICall_start(ASGICall *self)
{
    self->state = CALL_STARTED;
    PyObject *enter_args[2] = {self->scope, self->send};
    PyObject *sender = ASGIFast_enter((ASGIFast *)self->fast, enter_args, 2);
    if (sender == NULL) {
        return -1; /* enter() counts its own failures: this is not one of them */
    }
    PyObject *aw;
    if (sender == Py_None) {
        Py_DECREF(sender);
        PyObject *args[4] = {self->middleware, self->scope, self->receive, self->send};
        aw = PyObject_VectorcallMethod(key_call_python, args,
                                       4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    else {
        self->sender = sender;
        PyObject *args[3] = {self->scope, self->receive, sender};
        aw = PyObject_Vectorcall(self->app, args, 3, NULL);
    }
    ASGICall_drop_arguments(self);
    if (aw == NULL) {
        return -1;
    }
    self->inner = awaitable_iter(aw);
    Py_DECREF(aw);
    return self->inner == NULL ? -1 : 0;
}

static int
ASGICall_check_running(ASGICall *self)
{
    if (self->running) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return -1;
    }
    return 0;
}

static PySendResult
ASGICall_am_send(ASGICall *self, PyObject *arg, PyObject **result)
{
    *result = NULL;
    if (ASGICall_check_running(self) < 0) {
        return PYGEN_ERROR;
    }
    if (self->state == CALL_FINISHED) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    }
    self->running = 1;
    if (self->state == CALL_CREATED) {
        if (arg != Py_None) {
            self->running = 0;
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        if (ASGICall_start(self) < 0) {
            ASGICall_end(self);
            self->running = 0;
            return PYGEN_ERROR;
        }
    }
    PySendResult status = PyIter_Send(self->inner, arg, result);
    if (status != PYGEN_NEXT) {
        if (status == PYGEN_RETURN) {
            Py_SETREF(*result, Py_NewRef(Py_None)); /* the middleware returns None */
        }
        ASGICall_end(self);
    }
    self->running = 0;
    return status;
}

static PyObject *
ASGICall_iternext(ASGICall *self)
{
    PyObject *result;
    PySendResult status = ASGICall_am_send(self, Py_None, &result);
    if (status == PYGEN_NEXT) {
        return result;
    }
    Py_XDECREF(result); /* PYGEN_RETURN: None, the end of iteration */
    return NULL;
}

static PyObject *
ASGICall_send(ASGICall *self, PyObject *value)
{
    PyObject *result;
    PySendResult status = ASGICall_am_send(self, value, &result);
    if (status == PYGEN_RETURN) {
        Py_DECREF(result);
        PyErr_SetNone(PyExc_StopIteration);
        return NULL;
    }
    return result;
}

/* Closes the awaited object (its close(), if it has one): 0, or -1 with its exception. */
static int
ASGICall_close_inner(ASGICall *self)
{
    PyObject *close;
    int found = lookup_attr(self->inner, key_close, &close);
    if (found <= 0) {
        return found;
    }
    PyObject *closed = PyObject_CallNoArgs(close);
    Py_DECREF(close);
    if (closed == NULL) {
        return -1;
    }
    Py_DECREF(closed);
    return 0;
}

/* Raises what throw(type[, value[, traceback]]) was given, as a coroutine not running does. */
static void
raise_thrown(PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *type = args[0];
    PyObject *value = nargs > 1 ? args[1] : NULL;
    PyObject *traceback = nargs > 2 ? args[2] : NULL;
    if (traceback == Py_None) {
        traceback = NULL;
    }
    if (traceback != NULL && !PyTraceBack_Check(traceback)) {
        PyErr_SetString(PyExc_TypeError, "throw() third argument must be a traceback object");
        return;
    }
    if (PyExceptionClass_Check(type)) {
        PyObject *t = Py_NewRef(type), *v = Py_XNewRef(value), *tb = Py_XNewRef(traceback);
        PyErr_NormalizeException(&t, &v, &tb);
        if (tb != NULL && v != NULL) {
            PyException_SetTraceback(v, tb);
        }
        PyErr_Restore(t, v, tb);
    }
    else if (PyExceptionInstance_Check(type)) {
        if (value != NULL && value != Py_None) {
            PyErr_SetString(PyExc_TypeError, "instance exception may not have a separate value");
            return;
        }
        PyObject *tb = traceback != NULL ? Py_NewRef(traceback) : PyException_GetTraceback(type);
        if (tb != NULL) {
            PyException_SetTraceback(type, tb);
        }
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(type)), Py_NewRef(type), tb);
    }
    else {
        PyErr_Format(PyExc_TypeError,
                     "exceptions must be classes or instances deriving from BaseException, "
                     "not %s",
                     Py_TYPE(type)->tp_name);
    }
}

static PyObject *
ASGICall_throw(ASGICall *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", nargs);
        return NULL;
    }
    if (ASGICall_check_running(self) < 0) {
        return NULL;
    }
    if (self->state != CALL_STARTED) {
        /* Not started (it never will be) or over: raised here, as by a coroutine. */
        self->state = CALL_FINISHED;
        ASGICall_drop_arguments(self);
        raise_thrown(args, nargs);
        return NULL;
    }
    self->running = 1;
    PyObject *throw;
    PyObject *result = NULL;
    if (PyErr_GivenExceptionMatches(args[0], PyExc_GeneratorExit)) {
        /* As gen_throw does: the awaited object is closed, not thrown into; then GeneratorExit
         * (or what closing raised) is raised at the await. */
        if (ASGICall_close_inner(self) == 0) {
            raise_thrown(args, nargs);
        }
    }
    else {
        int found = lookup_attr(self->inner, key_throw, &throw);
        if (found > 0) {
            result = PyObject_Vectorcall(throw, args, (size_t)nargs, NULL);
            Py_DECREF(throw);
        }
        else if (found == 0) {
            raise_thrown(args, nargs); /* raised at the await, in the middleware */
        }
    }
    if (result == NULL) {
        int returned = PyErr_ExceptionMatches(PyExc_StopIteration);
        if (returned) {
            PyErr_Clear();
        }
        ASGICall_end(self);
        if (returned) {
            PyErr_SetNone(PyExc_StopIteration);
        }
    }
    self->running = 0;
    return result;
}

/* close(): the awaited object closed, then the request ends with GeneratorExit (or with what
 * closing raised), as gen_close does. */
static PyObject *
ASGICall_close(ASGICall *self, PyObject *Py_UNUSED(ignored))
{
    if (ASGICall_check_running(self) < 0) {
        return NULL;
    }
    if (self->state != CALL_STARTED) {
        self->state = CALL_FINISHED;
        ASGICall_drop_arguments(self);
        Py_RETURN_NONE;
    }
    self->running = 1;
    int failed = ASGICall_close_inner(self) < 0;
    if (!failed) {
        PyErr_SetNone(PyExc_GeneratorExit);
    }
    ASGICall_end(self);
    self->running = 0;
    if (failed) {
        return NULL;
    }
    PyErr_Clear(); /* GeneratorExit: closed */
    Py_RETURN_NONE;
}

static void
ASGICall_finalize(ASGICall *self)
{
    if (self->state == CALL_FINISHED) {
        return;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (self->state == CALL_CREATED) {
        self->state = CALL_FINISHED;
        if (PyErr_WarnEx(PyExc_RuntimeWarning,
                         "coroutine 'ASGIMiddleware.__call__' was never awaited", 1) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
    }
    else {
        PyObject *closed = ASGICall_close(self, NULL);
        if (closed == NULL) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
        Py_XDECREF(closed);
    }
    PyErr_Restore(type, value, traceback);
}

static PyObject *
ASGICall_await(ASGICall *self)
{
    return Py_NewRef(self);
}

static PyMethodDef ASGICall_methods[] = {
    {"send", (PyCFunction)ASGICall_send, METH_O, "send(value): the next step, as a coroutine's."},
    {"throw", (PyCFunction)(void (*)(void))ASGICall_throw, METH_FASTCALL,
     "throw(type[, value[, traceback]]): raise at the current await, as a coroutine's."},
    {"close", (PyCFunction)ASGICall_close, METH_NOARGS, "close(): as a coroutine's."},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods ASGICall_async = {
    .am_await = (unaryfunc)ASGICall_await,
    .am_send = (sendfunc)ASGICall_am_send,
};

static PyTypeObject ASGICallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.ASGICall",
    .tp_doc = "One call of ASGIMiddleware.__call__ on the compiled path: a coroutine-like "
              "awaitable.",
    .tp_basicsize = sizeof(ASGICall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)ASGICall_dealloc,
    .tp_traverse = (traverseproc)ASGICall_traverse,
    .tp_clear = (inquiry)ASGICall_clear,
    .tp_finalize = (destructor)ASGICall_finalize,
    .tp_as_async = &ASGICall_async,
    .tp_iternext = (iternextfunc)ASGICall_iternext,
    .tp_methods = ASGICall_methods,
};

/* ASGIBase is the compiled base of memwatch.asgi.ASGIMiddleware: it holds the two attributes
 * the compiled __call__ reads at every request, `app` and `_fast`, in slots (read without a
 * look-up) instead of the instance's __dict__. Reassigning either is seen by the next request. */
typedef struct {
    PyObject_HEAD
    PyObject *app;
    PyObject *fast;
} ASGIBase;

static int
ASGIBase_traverse(ASGIBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->fast);
    return 0; /* subtype_traverse visits a heap subclass's type itself */
}

static int
ASGIBase_clear(ASGIBase *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->fast);
    return 0;
}

static void
ASGIBase_dealloc(ASGIBase *self)
{
    PyObject_GC_UnTrack(self);
    ASGIBase_clear(self);
    /* A Python subclass's type reference is dropped by subtype_dealloc, not here. */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef ASGIBase_members[] = {
    {"app", T_OBJECT, offsetof(ASGIBase, app), 0, "The wrapped ASGI application."},
    {"_fast", T_OBJECT, offsetof(ASGIBase, fast), 0,
     "The compiled fast path (memwatch._speedups.ASGIFast), or None."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ASGIBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.ASGIBase",
    .tp_doc = "Compiled base of memwatch.asgi.ASGIMiddleware: app and _fast in slots.",
    .tp_basicsize = sizeof(ASGIBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)ASGIBase_dealloc,
    .tp_traverse = (traverseproc)ASGIBase_traverse,
    .tp_clear = (inquiry)ASGIBase_clear,
    .tp_members = ASGIBase_members,
};

static PyObject *
AsyncCall_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                     PyObject *kwnames)
{
    AsyncCall *self = (AsyncCall *)callable;
    if (PyVectorcall_NARGS(nargsf) == 4 && (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0) &&
        PyObject_TypeCheck(args[0], &ASGIBaseType)) {
        PyObject *fast = ((ASGIBase *)args[0])->fast;
        PyObject *app = ((ASGIBase *)args[0])->app;
        if (fast != NULL && app != NULL && Py_TYPE(fast) == &ASGIFastType) {
            ASGICall *call = PyObject_GC_New(ASGICall, &ASGICallType);
            if (call != NULL) {
                call->middleware = Py_NewRef(args[0]);
                call->fast = Py_NewRef(fast);
                call->app = Py_NewRef(app);
                call->scope = Py_NewRef(args[1]);
                call->receive = Py_NewRef(args[2]);
                call->send = Py_NewRef(args[3]);
                call->inner = NULL;
                call->sender = NULL;
                call->state = CALL_CREATED;
                call->running = 0;
                PyObject_GC_Track(call);
                return (PyObject *)call;
            }
            PyErr_Clear(); /* the coroutine instead */
        }
    }
    return PyObject_Vectorcall(self->func, args, nargsf, kwnames);
}

static PyObject *
AsyncCall_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *func;
    if ((kwds != NULL && PyDict_GET_SIZE(kwds) != 0) ||
        !PyArg_UnpackTuple(args, "AsyncCall", 1, 1, &func)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "AsyncCall() takes no keyword arguments");
        }
        return NULL;
    }
    if (!PyCallable_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "AsyncCall() needs a coroutine function");
        return NULL;
    }
    AsyncCall *self = (AsyncCall *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->func = Py_NewRef(func);
    self->dict = NULL;
    self->vectorcall = AsyncCall_vectorcall;
    return (PyObject *)self;
}

static int
AsyncCall_traverse(AsyncCall *self, visitproc visit, void *arg)
{
    Py_VISIT(self->func);
    Py_VISIT(self->dict);
    return 0;
}

static int
AsyncCall_clear(AsyncCall *self)
{
    Py_CLEAR(self->func);
    Py_CLEAR(self->dict);
    return 0;
}

static void
AsyncCall_dealloc(AsyncCall *self)
{
    PyObject_GC_UnTrack(self);
    AsyncCall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Read on an instance: a bound method (whose __func__ is this descriptor, as for a function). */
static PyObject *
AsyncCall_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyGetSetDef AsyncCall_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AsyncCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.AsyncCall",
    .tp_doc = "AsyncCall(func): ASGIMiddleware.__call__ stepped in C (func is the reference).",
    .tp_basicsize = sizeof(AsyncCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = AsyncCall_new,
    .tp_dealloc = (destructor)AsyncCall_dealloc,
    .tp_traverse = (traverseproc)AsyncCall_traverse,
    .tp_clear = (inquiry)AsyncCall_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(AsyncCall, vectorcall),
    .tp_descr_get = AsyncCall_get,
    .tp_dictoffset = offsetof(AsyncCall, dict),
    .tp_getset = AsyncCall_getset,
};

/* --- Flask: the matched rule, caught where Flask stores it ----------------------------------
 *
 * RuleSlot is the ``url_rule`` attribute of the request class memwatch gives a Flask app (a
 * subclass of the app's own): Flask sets ``request.url_rule`` once per request when routing
 * matched, and the slot also copies ``rule.rule`` (the template) into ``request.environ`` under
 * memwatch's key. No hook runs per request (a URL-value preprocessor or a before_request
 * function costs 20,000-30,000 instructions a request through Flask's proxies). The value lives
 * in the instance's __dict__, as a plain attribute would; reading it on the class gives None,
 * as Flask's class attribute does. Never raises on the app's behalf when copying.
 */

typedef struct {
    PyObject_HEAD
    PyObject *route_key;
} RuleSlot;

static PyObject *key_url_rule, *key_rule, *key_environ;

static int
RuleSlot_init(RuleSlot *self, PyObject *args, PyObject *kwds)
{
    PyObject *route_key;
    if (!PyArg_ParseTuple(args, "U", &route_key)) {
        return -1;
    }
    Py_XSETREF(self->route_key, Py_NewRef(route_key));
    return 0;
}

static void
RuleSlot_dealloc(RuleSlot *self)
{
    Py_CLEAR(self->route_key);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
RuleSlot_get(RuleSlot *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        Py_RETURN_NONE;
    }
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL) {
        return NULL;
    }
    PyObject *value = PyDict_GetItemWithError(dict, key_url_rule);
    Py_DECREF(dict);
    if (value == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return Py_NewRef(value);
}

static int
RuleSlot_set(RuleSlot *self, PyObject *obj, PyObject *value)
{
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL) {
        return -1;
    }
    int rc;
    if (value == NULL) {
        rc = PyDict_DelItem(dict, key_url_rule);
        if (rc < 0 && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_SetObject(PyExc_AttributeError, key_url_rule);
        }
        Py_DECREF(dict);
        return rc;
    }
    rc = PyDict_SetItem(dict, key_url_rule, value);
    if (rc == 0 && value != Py_None && self->route_key != NULL) {
        /* memwatch's part: best effort, never an error for the app */
        PyObject *template, *environ;
        if (lookup_attr(value, key_rule, &template) > 0) {
            environ = PyDict_GetItemWithError(dict, key_environ);
            if (environ != NULL && PyUnicode_Check(template) && PyDict_Check(environ)) {
                if (PyDict_SetItem(environ, self->route_key, template) < 0) {
                    PyErr_Clear();
                }
            }
            Py_DECREF(template);
        }
        PyErr_Clear();
    }
    Py_DECREF(dict);
    return rc;
}

static PyTypeObject RuleSlotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memwatch._speedups.RuleSlot",
    .tp_doc = "Flask's request.url_rule, which also copies the rule's template into the environ.",
    .tp_basicsize = sizeof(RuleSlot),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RuleSlot_init,
    .tp_dealloc = (destructor)RuleSlot_dealloc,
    .tp_descr_get = (descrgetfunc)RuleSlot_get,
    .tp_descr_set = (descrsetfunc)RuleSlot_set,
};

/* bloom_add(array, mask, hashes, h) -> bits newly set: memwatch.sketch.FirstSeenFilter.add's
 * double hashing (positions h1 + i * h2 over the low and high 32 bits, h2 odd) in C. */
static PyObject *
speedups_bloom_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyByteArray_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "bloom_add(array: bytearray, mask, hashes, h)");
        return NULL;
    }
    unsigned long long mask = PyLong_AsUnsignedLongLong(args[1]);
    if (mask == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    long hashes = PyLong_AsLong(args[2]);
    if (hashes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long long h = PyLong_AsUnsignedLongLong(args[3]);
    if (h == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyByteArray_GET_SIZE(args[0]);
    if ((Py_ssize_t)((mask >> 3) + 1) > size || hashes < 0 || hashes > 64) {
        PyErr_SetString(PyExc_ValueError, "bloom_add: mask or hashes do not fit the array");
        return NULL;
    }
    unsigned char *array = (unsigned char *)PyByteArray_AS_STRING(args[0]);
    uint64_t position = h & 0xFFFFFFFFULL;
    uint64_t step = ((h >> 32) & 0xFFFFFFFFULL) | 1;
    long added = 0;
    for (long i = 0; i < hashes; i++) {
        uint64_t bit = position & mask;
        unsigned char flag = (unsigned char)(1u << (bit & 7));
        if (!(array[bit >> 3] & flag)) {
            array[bit >> 3] |= flag;
            added++;
        }
        position += step;
    }
    return PyLong_FromLong(added);
}

static PyMethodDef speedups_functions[] = {
    {"keyed_hash", (PyCFunction)(void (*)(void))speedups_keyed_hash, METH_FASTCALL,
     "keyed_hash(key, credential) -> int: the fingerprint hash (key: 16 bytes)."},
    {"bloom_add", (PyCFunction)(void (*)(void))speedups_bloom_add, METH_FASTCALL,
     "bloom_add(array, mask, hashes, h) -> bits newly set (FirstSeenFilter.add in C)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "memwatch._speedups",
    .m_doc = "The per-request recording path of memwatch, in C (optional; see memwatch.fast).",
    .m_size = -1,
    .m_methods = speedups_functions,
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
        intern(&str_unmatched, "__unmatched__") < 0 || intern(&str_root, "/") < 0 ||
        intern(&key_path_info, "PATH_INFO") < 0 ||
        intern(&key_file_wrapper, "wsgi.file_wrapper") < 0 ||
        intern(&key_gate, "_gate") < 0 || intern(&key_due, "due") < 0 ||
        intern(&key_event, "_event") < 0 || intern(&key_diagnosis, "diagnosis") < 0 ||
        intern(&key_window, "window") < 0 || intern(&key_recorder, "recorder") < 0 ||
        intern(&key_record_environ, "record_environ") < 0 ||
        intern(&key_errors, "errors") < 0 || intern(&key_record, "record") < 0 ||
        intern(&key_respond, "_respond") < 0 || intern(&str_500, "500") < 0 ||
        intern(&str_wsgi_entry, "wsgi.entry") < 0 || intern(&str_wsgi_finish, "wsgi.finish") < 0 ||
        intern(&key_close, "close") < 0 ||
        intern(&key_call_python, "_call_python") < 0 ||
        intern(&str_empty, "") < 0 ||
        intern(&key_type, "type") < 0 || intern(&key_status, "status") < 0 ||
        intern(&str_http, "http") < 0 ||
        intern(&str_response_start, "http.response.start") < 0 ||
        intern(&str_asgi_entry, "asgi.entry") < 0 || intern(&str_asgi_finish, "asgi.finish") < 0 ||
        intern(&key_url_rule, "url_rule") < 0 || intern(&key_rule, "rule") < 0 ||
        intern(&key_environ, "environ") < 0 ||
        intern(&key_throw, "throw") < 0 ||
        intern(&key_record_measured, "record_measured") < 0 ||
        intern(&key_finish, "finish") < 0) {
        return NULL;
    }
    int_zero = PyLong_FromLong(0);
    int_500 = PyLong_FromLong(500);
    if (int_zero == NULL || int_500 == NULL) {
        return NULL;
    }
    if (PyType_Ready(&RecorderType) < 0 || PyType_Ready(&WSGIResponseType) < 0 ||
        PyType_Ready(&WSGIBaseType) < 0 || PyType_Ready(&ASGIFastType) < 0 ||
        PyType_Ready(&StatusSendType) < 0 || PyType_Ready(&RuleSlotType) < 0 ||
        PyType_Ready(&GateType) < 0 || PyType_Ready(&ASGICallType) < 0 ||
        PyType_Ready(&AsyncCallType) < 0 || PyType_Ready(&ASGIBaseType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Recorder", (PyObject *)&RecorderType) < 0 ||
        PyModule_AddObjectRef(module, "WSGIBase", (PyObject *)&WSGIBaseType) < 0 ||
        PyModule_AddObjectRef(module, "WSGIResponse", (PyObject *)&WSGIResponseType) < 0 ||
        PyModule_AddObjectRef(module, "ASGIFast", (PyObject *)&ASGIFastType) < 0 ||
        PyModule_AddObjectRef(module, "StatusSend", (PyObject *)&StatusSendType) < 0 ||
        PyModule_AddObjectRef(module, "RuleSlot", (PyObject *)&RuleSlotType) < 0 ||
        PyModule_AddObjectRef(module, "Gate", (PyObject *)&GateType) < 0 ||
        PyModule_AddObjectRef(module, "ASGICall", (PyObject *)&ASGICallType) < 0 ||
        PyModule_AddObjectRef(module, "AsyncCall", (PyObject *)&AsyncCallType) < 0 ||
        PyModule_AddObjectRef(module, "ASGIBase", (PyObject *)&ASGIBaseType) < 0 ||
        PyModule_AddIntConstant(module, "BATCH_SIZE", BATCH_SIZE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
