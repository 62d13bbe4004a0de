/* The compiled header walker of tarindex.py (issue 15): walks a tar's member headers in a mapped buffer
 * at memory speed and hands Python compact columns.
 *
 * It takes only what it can read exactly as tarindex._parse_chain (the general parser) would: plain ustar
 * headers of regular files (type '0', NUL or '7') whose checksum, size and mtime fields parse, optionally
 * preceded by one pax header ('x') whose records are well formed and say nothing but keys the general
 * parser ignores (an mtime, comments, atimes...). At anything else (end of archive, a bad checksum, a
 * truncation, GNU long names 'L'/'K', pax 'g' or path/size records, links, folders, odd number spellings)
 * it stops and returns where; Python's general parser then parses that one member (and writes every
 * error message, naming the tar), and the walk resumes after it. So messages, checks and results are the
 * general parser's by construction; the tests compare both member for member (and with tarfile).
 *
 * walk(fd or buffer, offset, file_size, limit, member_type[, sample_type]) ->
 *     (stop, full, names, heads, datas, sizes, regular, mtimes, layout, suspect)
 *   stop     byte offset where the walk stopped (the next header chain to parse)
 *   full     True when it stopped because it took `limit` members (call again from `stop`)
 *   names... one list per column, as tarindex.Batch holds them
 *   layout   (keep, dots, starts, members, keys, samples) as tarindex.Layout: the grouping, with the kept
 *            members made as member_type (tarindex.Member) tuples, in one list per sample, each sample's
 *            key, and with sample_type the samples made (else None); or None where the grouping
 *            must be done one member at a time in Python (a non-ASCII name, an extension repeated within a
 *            key's run)
 *   suspect  True when a name starts with '/' or holds "..": Python checks every name (unsafe names)
 *
 * The walk itself runs without the GIL (page faults of a cold file included), so indexing overlaps the
 * copy threads and the interpreter.
 */
#define _GNU_SOURCE /* memmem, preadv2 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* PyMemberDescrObject, T_OBJECT_EX: Sample's slots, stored directly */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#if defined(__SSE2__) && defined(__x86_64__)
#include <emmintrin.h>
#endif

#define BLOCK 512
#define MAX_RUN 64 /* members of one key checked for repeated extensions; longer runs: layout None */

typedef struct {
    int64_t head;      /* header chain start (the pax header when there is one) */
    int64_t header;    /* the member's own header */
    int64_t size;
    int64_t mtime;
    int64_t text_at;   /* where its pax mtime spelling (if any) and then its name lie in Records.text */
    int pax_mtime_len; /* > 0: a pax mtime to convert with the GIL held (rare spellings) */
    int name_len;
} Rec;

typedef struct {
    unsigned char *data;
    size_t len, cap;
} Bytes;

/* Room for `n` more bytes at b->data + b->len (grown by doubling); NULL when out of memory. */
static unsigned char *bytes_room(Bytes *b, size_t n) {
    if (b->len + n > b->cap) {
        size_t grown = b->cap ? b->cap * 2 : 4096;
        while (grown < b->len + n)
            grown *= 2;
        unsigned char *more = realloc(b->data, grown);
        if (more == NULL)
            return NULL;
        b->data = more;
        b->cap = grown;
    }
    return b->data + b->len;
}

static int bytes_put(Bytes *b, const void *p, size_t n) {
    unsigned char *room = bytes_room(b, n);
    if (room == NULL)
        return -1;
    memcpy(room, p, n);
    b->len += n;
    return 0;
}

/* The walk's records, with the names (and rare pax mtime spellings) copied out of the read windows into
 * one text buffer: a record stays small (48 bytes, not a 256-byte name field each), so a batch touches
 * fewer fresh pages. */
typedef struct {
    Rec *recs;
    Py_ssize_t cap;
    Bytes text;
} Records;

#define REC_TEXT_MAX (48 + 160 + 100) /* a pax mtime spelling (mtime_text: at most 40) and a name (256) */

static void records_free(Records *out) {
    free(out->recs);
    free(out->text.data);
}

static int is_ws(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

/* tarindex._octal for the spellings it takes: base-256 (non-negative, fits 63 bits) or octal digits
 * between ASCII whitespace, cut at the first NUL. Returns 0 for any other spelling (Python decides). */
static int number(const unsigned char *f, int n, int64_t *out) {
    if (n > 0 && (f[0] & 0x80)) {
        if (f[0] & 0x40)
            return 0;
        uint64_t v = 0;
        for (int i = 1; i < n; i++) {
            if (v >> 55)
                return 0;
            v = (v << 8) | f[i];
        }
        if (v >> 63)
            return 0;
        *out = (int64_t)v;
        return 1;
    }
    int end = 0;
    while (end < n && f[end])
        end++;
    int s = 0, e = end;
    while (s < e && is_ws(f[s]))
        s++;
    while (e > s && is_ws(f[e - 1]))
        e--;
    uint64_t v = 0;
    for (int i = s; i < e; i++) {
        if (f[i] < '0' || f[i] > '7')
            return 0;
        v = v * 8 + (uint64_t)(f[i] - '0');
    }
    *out = (int64_t)v; /* at most 12 digits here: no overflow */
    return 1;
}

/* The sum of a block's 512 bytes: with SSE2, sums of absolute differences against zero (16 bytes an
 * instruction, a fraction of the widening loop's cost; a walk checksums two headers per member). */
static uint32_t byte_sum(const unsigned char *b) {
#if defined(__SSE2__) && defined(__x86_64__)
    __m128i zero = _mm_setzero_si128(), sums = zero;
    for (int i = 0; i < BLOCK; i += 16)
        sums = _mm_add_epi64(sums, _mm_sad_epu8(_mm_loadu_si128((const __m128i *)(b + i)), zero));
    return (uint32_t)(_mm_cvtsi128_si64(sums) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(sums, sums)));
#else
    uint32_t total = 0;
    for (int i = 0; i < BLOCK; i++) /* vectorised by the compiler */
        total += b[i];
    return total;
#endif
}

/* tarindex._checksum_ok, exactly (its "signed" variant included); 0 also when the stored field is
 * spelled in a way number() leaves to Python. */
static int checksum_ok(const unsigned char *b) {
    int64_t stored;
    if (!number(b + 148, 8, &stored))
        return 0;
    uint32_t total = byte_sum(b), field = 0;
    for (int i = 148; i < 156; i++)
        field += b[i];
    int64_t unsigned_sum = (int64_t)total - field + 8 * 32;
    if (stored == unsigned_sum)
        return 1;
    int64_t high = 0; /* the rare writer that summed signed bytes */
    for (int i = 0; i < BLOCK; i++)
        if ((i < 148 || i >= 156) && b[i] > 127)
            high += b[i];
    return stored == unsigned_sum - 2 * high;
}

/* A well-formed pax mtime value: [+-]digits[.digits], at least one digit, short. */
static int mtime_text(const unsigned char *v, int n) {
    if (n <= 0 || n > 40)
        return 0;
    int i = 0, digits = 0;
    if (v[0] == '+' || v[0] == '-')
        i++;
    while (i < n && v[i] >= '0' && v[i] <= '9')
        i++, digits++;
    if (i < n && v[i] == '.') {
        i++;
        while (i < n && v[i] >= '0' && v[i] <= '9')
            i++, digits++;
    }
    return i == n && digits > 0;
}

/* int(float(text)) without Python where it is certainly the integer part: no sign, an integer part below
 * 2**32 and a fraction that does not start with 999 (so rounding to a double cannot reach the next
 * integer). Returns 0 when the conversion must go through Python's float. */
static int quick_mtime(const unsigned char *v, int n, int64_t *out) {
    int64_t whole = 0;
    int i = 0;
    if (v[0] == '+' || v[0] == '-')
        return 0;
    while (i < n && v[i] != '.') {
        whole = whole * 10 + (v[i] - '0');
        if (whole >= ((int64_t)1 << 32))
            return 0;
        i++;
    }
    if (i + 3 < n && v[i + 1] == '9' && v[i + 2] == '9' && v[i + 3] == '9')
        return 0;
    *out = whole;
    return 1;
}

/* Records of a pax header, as tarindex._pax_records reads them, for the well-formed case only:
 * "<digits> key=value\n" records filling the data up to a NUL or its end. Sets *mtime and *mtime_len to the
 * last mtime value (NULL when none). Returns 0 (Python decides) for anything else or for a key that
 * changes the member (path, size, GNU.sparse...). */
static int pax_records(const unsigned char *d, int64_t n, const unsigned char **mtime, int *mtime_len) {
    int64_t pos = 0;
    *mtime = NULL;
    while (pos < n && d[pos] != 0) {
        int64_t length = 0, i = pos;
        while (i < n && d[i] >= '0' && d[i] <= '9') {
            length = length * 10 + (d[i] - '0');
            if (length > n)
                return 0;
            i++;
        }
        if (i == pos || i >= n || d[i] != ' ' || length <= 0 || pos + length > n)
            return 0;
        const unsigned char *rec = d + i + 1, *end = d + pos + length - 1;
        if (end < rec || *end != '\n')
            return 0;
        const unsigned char *eq = memchr(rec, '=', (size_t)(end - rec));
        if (eq == NULL)
            return 0;
        int64_t klen = eq - rec;
        if ((klen >= 4 && (memcmp(rec, "path", 4) == 0 || memcmp(rec, "size", 4) == 0))
            || (klen >= 10 && memcmp(rec, "GNU.sparse", 10) == 0))
            return 0;
        if (klen == 5 && memcmp(rec, "mtime", 5) == 0) {
            const unsigned char *value = eq + 1;
            int vlen = (int)(end - value);
            if (!mtime_text(value, vlen))
                return 0;
            *mtime = value;
            *mtime_len = vlen;
        }
        pos += length;
    }
    return 1;
}

/* Where the walker reads: a mapped buffer, or a file descriptor read with pread into a window (no page
 * is mapped: mapping a cached image shard costs the kernel more than the walk itself, as fault-around maps
 * nearly every page of it). Windows adapt: a read that runs off the end of the previous window (dense
 * headers) doubles it, up to WINDOW_MAX; a jump past a large member reads as much as the reads since the
 * previous jump used (and a slack), so an image shard costs one read per sample, of its cluster of
 * small members and headers. */
#define WINDOW_MIN 1024
#define WINDOW_MAX (1 << 20)

/* Bytes read past what the previous cluster used, for a cluster that is larger (a longer caption): each
 * time one runs off its window (a second read) the slack grows by a block, and after STEADY_JUMPS jumps
 * without that it shrinks by one. Shards whose clusters keep one size (img2dataset's, ours) end up
 * reading no slack at all (15-30% fewer bytes copied); captions of varied lengths keep a few blocks. */
#define SLACK_START (2 * BLOCK)
#define SLACK_MAX (8 * BLOCK)
#define STEADY_JUMPS 32

/* A cold file: the windows alone would be one small synchronous read per sample (the kernel sees no
 * sequential reading in them), and the copy that follows would read the file again. So where a window is
 * not in the page cache (preadv2 with RWF_NOWAIT says so; it is asked once per PROBE_STEP of the file, a
 * plain pread being cheaper for the reads between), the walker first asks the kernel to read the file
 * ADVISE_AHEAD bytes ahead (POSIX_FADV_WILLNEED, in ADVISE_STEP requests: the kernel caps one request at
 * its readahead size): large sequential reads at the disk's speed, and the copy finds every page cached. */
#define ADVISE_STEP ((int64_t)2 << 20)
#define ADVISE_AHEAD ((int64_t)64 << 20)
#define PROBE_STEP ((int64_t)1 << 20)

typedef struct {
    const unsigned char *buf; /* mapped: the whole file */
    int fd;
    unsigned char *win;
    int64_t win_at, win_len, used_end, want, file_size;
    int64_t cluster_at; /* where the reads since the last jump began */
    int64_t slack;      /* see SLACK_START */
    int steady;         /* jumps since the last run off a window's end */
    int64_t advised_end; /* read-ahead asked for up to here; file_size: never again (no RWF_NOWAIT) */
    int64_t probe_at;    /* the next read from here on checks the page cache first */
} Source;

/* pread, asking for read-ahead first where the bytes are not cached (see ADVISE_AHEAD): checked at the
 * first read of each PROBE_STEP and at the end of what was advised, so a cold stretch is found within a
 * few samples. */
static ssize_t read_at(Source *src, unsigned char *to, int64_t n, int64_t at) {
#ifdef RWF_NOWAIT
    if (src->advised_end < src->file_size && at >= src->probe_at) {
        struct iovec v = {to, (size_t)n};
        ssize_t got = preadv2(src->fd, &v, 1, (off_t)at, RWF_NOWAIT);
        src->probe_at = at + PROBE_STEP;
        if (got < 0 && errno != EAGAIN) {
            src->advised_end = src->file_size; /* no RWF_NOWAIT here (old kernel, file system) */
        } else if (got != n) {
            int64_t from = src->advised_end > at ? src->advised_end : at;
            int64_t until = at + ADVISE_AHEAD < src->file_size ? at + ADVISE_AHEAD : src->file_size;
            for (; from < until; from += ADVISE_STEP)
                posix_fadvise(src->fd, (off_t)from, (off_t)ADVISE_STEP, POSIX_FADV_WILLNEED);
            if (until > src->advised_end)
                src->advised_end = until;
        }
        if (src->advised_end > at && src->advised_end < src->probe_at)
            src->probe_at = src->advised_end; /* the first read past what was advised checks again */
        if (got == n)
            return got;
    }
#endif
    return pread(src->fd, to, (size_t)n, (off_t)at);
}

/* `need` bytes at `at`, or NULL when they are not all in the file (or cannot be read). */
static const unsigned char *get(Source *src, int64_t at, int64_t need) {
    if (at < 0 || need > src->file_size - at)
        return NULL;
    if (src->buf != NULL)
        return src->buf + at;
    if (at >= src->win_at && at + need <= src->win_at + src->win_len) {
        if (at + need > src->used_end)
            src->used_end = at + need;
        return src->win + (at - src->win_at);
    }
    if (need > WINDOW_MAX)
        return NULL; /* a pax header this large: Python reads it */
    int64_t end = src->win_at + src->win_len;
    if (src->win_len > 0 && at >= src->win_at && at < end + src->want) { /* ran off the end */
        src->want = src->want * 2 > WINDOW_MAX ? WINDOW_MAX : src->want * 2;
        if (src->slack < SLACK_MAX)
            src->slack += BLOCK;
        src->steady = 0;
    } else if (src->win_len > 0) { /* a jump: read what the cluster before it used, and the slack */
        int64_t used = ((src->used_end - src->cluster_at + BLOCK - 1) & ~(int64_t)(BLOCK - 1)) + src->slack;
        src->want = used < WINDOW_MIN ? WINDOW_MIN : used > WINDOW_MAX ? WINDOW_MAX : used;
        src->cluster_at = at;
        if (++src->steady == STEADY_JUMPS && src->slack > 0) {
            src->slack -= BLOCK;
            src->steady = 0;
        }
    }
    int64_t size = src->want > need ? src->want : need;
    if (size > src->file_size - at)
        size = src->file_size - at;
    int64_t got = 0;
    while (got < size) {
        ssize_t n = read_at(src, src->win + got, size - got, at + got);
        if (n <= 0)
            break; /* an error or a file that shrank: the walk stops, Python reads on */
        got += n;
    }
    src->win_at = at;
    src->win_len = got;
    src->used_end = at + need;
    return got >= need ? src->win : NULL;
}

/* A plain header at `at` that this walker takes: its size (and mtime unless `want_mtime` is 0). */
static const unsigned char *plain_header(Source *src, int64_t at, int64_t *size, int64_t *mtime, int want_mtime) {
    const unsigned char *b = get(src, at, BLOCK);
    if (b == NULL)
        return NULL;
    unsigned char kind = b[156];
    if (b[0] == 0 || !(kind == '0' || kind == 0 || kind == '7'))
        return NULL;
    if (!checksum_ok(b) || !number(b + 124, 12, size) || at + BLOCK + *size > src->file_size)
        return NULL;
    if (want_mtime && !number(b + 136, 12, mtime))
        return NULL;
    return b;
}

static int64_t padded(int64_t size) { return (size + BLOCK - 1) & ~(int64_t)(BLOCK - 1); }

/* The member's name as _parse_chain builds it: name field to its first NUL, behind "prefix/" when the
 * header is POSIX ustar with a prefix. Returns its length in `out` (at most 155 + 1 + 100 bytes). */
static int member_name(const unsigned char *b, unsigned char *out) {
    int n = 0;
    if (memcmp(b + 257, "ustar\0", 6) == 0 && b[345] != 0) {
        while (n < 155 && b[345 + n])
            out[n] = b[345 + n], n++;
        out[n++] = '/';
    }
    for (int i = 0; i < 100 && b[i]; i++)
        out[n++] = b[i];
    return n;
}

/* Walk from `offset`: fills out->recs from their start and appends to out->text (both grown as needed).
 * Returns the count; *stop is where it stopped. */
static Py_ssize_t walk_headers(Source *src, int64_t offset, Py_ssize_t limit, Records *out, int64_t *stop,
                               int *nomem) {
    Py_ssize_t count = 0;
    while (count < limit) {
        int64_t head = offset, at = offset, size, mtime = 0;
        const unsigned char *pax_mtime = NULL, *b = get(src, at, BLOCK);
        int pax_mtime_len = 0;
        if (b != NULL && b[156] == 'x') {
            int64_t length;
            if (b[0] == 0 || !checksum_ok(b) || !number(b + 124, 12, &length)
                || at + BLOCK + length > src->file_size)
                break;
            b = get(src, at, BLOCK + length); /* the pax header and its records in one piece */
            if (b == NULL || !pax_records(b + BLOCK, length, &pax_mtime, &pax_mtime_len))
                break;
            at += BLOCK + padded(length);
        }
        unsigned char *text = bytes_room(&out->text, REC_TEXT_MAX);
        if (count == out->cap) {
            Py_ssize_t grown = out->cap ? out->cap * 2 : 256;
            Rec *more = realloc(out->recs, (size_t)grown * sizeof(Rec));
            if (more != NULL) {
                out->recs = more;
                out->cap = grown;
            }
        }
        if (text == NULL || count == out->cap) {
            *nomem = 1;
            break;
        }
        Rec *r = &out->recs[count];
        r->text_at = (int64_t)out->text.len;
        r->pax_mtime_len = 0;
        if (pax_mtime != NULL && !quick_mtime(pax_mtime, pax_mtime_len, &mtime)) {
            memcpy(text, pax_mtime, (size_t)pax_mtime_len); /* the window may move: copied */
            r->pax_mtime_len = pax_mtime_len;
        }
        b = plain_header(src, at, &size, &mtime, pax_mtime == NULL);
        if (b == NULL)
            break;
        count++;
        r->head = head;
        r->header = at;
        r->size = size;
        r->mtime = mtime;
        r->name_len = member_name(b, text + r->pax_mtime_len);
        out->text.len += (size_t)(r->pax_mtime_len + r->name_len);
        offset = at + BLOCK + padded(size);
    }
    *stop = offset;
    return count;
}

typedef struct {
    int len;
    unsigned char text[BLOCK]; /* an extension, ASCII letters lowered */
} Ext;

static int append_long(PyObject *list, long long value) {
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int failed = PyList_Append(list, v);
    Py_DECREF(v);
    return failed;
}

/* The split of a member name that tarindex.group_members makes: its last slash, the first dot after it (the
 * key's end; -1 if none), whether the name is ASCII, and whether it is a top-level __metadata__ name. */
typedef struct {
    int last_slash, dot, ascii, metadata;
} NameParts;

static NameParts name_parts(const unsigned char *name, int n) {
    NameParts p = {-1, -1, 1, 0};
    for (int k = 0; k < n; k++) {
        if (name[k] >= 128)
            p.ascii = 0;
        else if (name[k] == '/')
            p.last_slash = k;
    }
    for (int k = p.last_slash + 1; k < n; k++)
        if (name[k] == '.') {
            p.dot = k;
            break;
        }
    p.metadata = p.last_slash < 0 && n >= 2 && name[0] == '_' && name[1] == '_' && name[n - 1] == '_'
                 && name[n - 2] == '_';
    return p;
}

/* Extension strings made for a batch: a shard repeats a few (jpg, txt, json), so each distinct spelling is
 * made once and shared by every member that has it. */
#define EXT_CACHE 8
#define EXT_CACHE_LEN 16

typedef struct {
    int layout_ok, run_len, prev_key_len, ext_cached;
    Py_ssize_t kept;
    unsigned char prev_key[BLOCK];
    Ext *run;
    PyObject *keep, *dots, *starts, *groups, *keys;
    int ext_len[EXT_CACHE];
    unsigned char ext_text[EXT_CACHE][EXT_CACHE_LEN];
    PyObject *ext_str[EXT_CACHE];
} Grouping;

/* The extension `text` (ASCII, as stored) as a str: the batch's shared one where it was made before. New
 * reference; NULL on error. */
static PyObject *ext_string(Grouping *g, const unsigned char *text, int n) {
    if (n > EXT_CACHE_LEN)
        return PyUnicode_DecodeASCII((const char *)text, n, NULL);
    for (int k = 0; k < g->ext_cached; k++)
        if (g->ext_len[k] == n && memcmp(g->ext_text[k], text, (size_t)n) == 0)
            return Py_NewRef(g->ext_str[k]);
    PyObject *made = PyUnicode_DecodeASCII((const char *)text, n, NULL);
    if (made != NULL && g->ext_cached < EXT_CACHE) {
        int k = g->ext_cached++;
        g->ext_len[k] = n;
        memcpy(g->ext_text[k], text, (size_t)n);
        g->ext_str[k] = Py_NewRef(made);
    }
    return made;
}

/* Member i of a batch into the grouping, as tarindex.group_members (and tarbulk._layout) does it: sets
 * keep[i], and for a kept member its dot, its sample (a new one at a new key) and its Member tuple. Names
 * that are not ASCII, too long, or an extension repeated within a key's run turn the layout off (Python
 * groups that batch). Returns -1 on a Python error. */
static int group_one(Grouping *g, Py_ssize_t i, const unsigned char *name, int n, int ends_in_slash, PyObject *text,
                     PyObject *data, PyObject *size, PyObject *head, PyObject *mtime, PyTypeObject *member_type) {
    NameParts parts = name_parts(name, n);
    int last_slash = parts.last_slash, dot = parts.dot;
    if (n >= BLOCK || !parts.ascii)
        g->layout_ok = 0;
    int kept_here = dot > last_slash + 1 && dot != n - 1 && !parts.metadata && !ends_in_slash;
    PyObject *flag = kept_here ? Py_True : Py_False;
    Py_INCREF(flag);
    PyList_SET_ITEM(g->keep, i, flag);
    if (!kept_here || !g->layout_ok)
        return 0;
    int key_len = dot, ext_len = n - dot - 1;
    int new_key = g->kept == 0 || key_len != g->prev_key_len || memcmp(g->prev_key, name, (size_t)key_len) != 0;
    if (new_key) {
        g->run_len = 0;
        memcpy(g->prev_key, name, (size_t)key_len);
        g->prev_key_len = key_len;
        PyObject *group = PyList_New(0);
        if (group == NULL || PyList_Append(g->groups, group) < 0) {
            Py_XDECREF(group);
            return -1;
        }
        Py_DECREF(group);
        PyObject *key = PyUnicode_DecodeASCII((const char *)name, key_len, NULL);
        if (key == NULL || PyList_Append(g->keys, key) < 0) {
            Py_XDECREF(key);
            return -1;
        }
        Py_DECREF(key);
        if (append_long(g->starts, g->kept) < 0)
            return -1;
    } else if (g->run_len == MAX_RUN) {
        g->layout_ok = 0;
        return 0;
    }
    Ext *here = &g->run[g->run_len];
    here->len = ext_len;
    for (int k = 0; k < ext_len; k++) {
        unsigned char c = name[dot + 1 + k];
        here->text[k] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    }
    for (int k = 0; k < g->run_len; k++)
        if (g->run[k].len == ext_len && memcmp(g->run[k].text, here->text, (size_t)ext_len) == 0)
            g->layout_ok = 0; /* webdataset starts a new sample here: grouped in Python */
    if (!g->layout_ok)
        return 0;
    g->run_len++;
    if (append_long(g->dots, dot) < 0)
        return -1;
    /* Member(name, ext, offset, size, header_offset, mtime), made as tuple.__new__(Member, ...) */
    PyObject *ext = ext_string(g, name + dot + 1, ext_len);
    if (ext == NULL)
        return -1;
    PyObject *member = member_type->tp_alloc(member_type, 6);
    if (member == NULL) {
        Py_DECREF(ext);
        return -1;
    }
    Py_INCREF(text);
    Py_INCREF(data);
    Py_INCREF(size);
    Py_INCREF(head);
    Py_INCREF(mtime);
    PyTuple_SET_ITEM(member, 0, text);
    PyTuple_SET_ITEM(member, 1, ext);
    PyTuple_SET_ITEM(member, 2, data);
    PyTuple_SET_ITEM(member, 3, size);
    PyTuple_SET_ITEM(member, 4, head);
    PyTuple_SET_ITEM(member, 5, mtime);
    PyObject_GC_UnTrack(member); /* str and int only: never part of a cycle (the GC would untrack a tuple) */
    int failed = PyList_Append(PyList_GET_ITEM(g->groups, PyList_GET_SIZE(g->groups) - 1), member);
    Py_DECREF(member);
    if (failed)
        return -1;
    g->kept++;
    return 0;
}

static int grouping_start(Grouping *g, Py_ssize_t count) {
    memset(g, 0, sizeof(*g));
    g->layout_ok = 1;
    g->keep = PyList_New(count);
    g->dots = PyList_New(0);
    g->starts = PyList_New(0);
    g->groups = PyList_New(0);
    g->keys = PyList_New(0);
    g->run = PyMem_Malloc(MAX_RUN * sizeof(Ext));
    if (!g->keep || !g->dots || !g->starts || !g->groups || !g->keys || !g->run) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Where `type` keeps the slot `name` (a plain object slot of a __slots__ class, found through its member
 * descriptor), or -1 where it is anything else (then the attribute is set the generic way). */
static Py_ssize_t slot_offset(PyTypeObject *type, PyObject *name) {
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name); /* a member descriptor gives itself */
    if (descr == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY) && member->offset > 0)
            offset = member->offset;
    }
    Py_DECREF(descr);
    return offset;
}

/* The samples as `sample_type` objects (tarindex.Sample: a slots dataclass whose __init__ only stores
 * `key` and `members`), made by storing the two slots of a bare instance directly (what the slots'
 * descriptors do, without an attribute lookup per store): a fraction of a call to the dataclass's Python
 * __init__ per sample. A type whose attributes are not such slots gets them set the generic way. NULL on
 * error. */
static PyObject *made_samples(Grouping *g, PyObject *sample_type) {
    PyTypeObject *type = (PyTypeObject *)sample_type;
    Py_ssize_t n = PyList_GET_SIZE(g->groups);
    PyObject *made = PyList_New(n);
    static PyObject *key_name = NULL, *members_name = NULL;
    if (key_name == NULL)
        key_name = PyUnicode_InternFromString("key");
    if (members_name == NULL)
        members_name = PyUnicode_InternFromString("members");
    if (made == NULL || key_name == NULL || members_name == NULL) {
        Py_XDECREF(made);
        return NULL;
    }
    Py_ssize_t key_at = slot_offset(type, key_name), members_at = slot_offset(type, members_name);
    int direct = key_at > 0 && members_at > 0 && type->tp_setattro == PyObject_GenericSetAttr;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *sample = type->tp_alloc(type, 0);
        if (sample == NULL) {
            Py_DECREF(made);
            return NULL;
        }
        PyList_SET_ITEM(made, i, sample);
        PyObject *key = PyList_GET_ITEM(g->keys, i), *members = PyList_GET_ITEM(g->groups, i);
        if (direct) { /* a fresh instance: both slots are empty */
            *(PyObject **)((char *)sample + key_at) = Py_NewRef(key);
            *(PyObject **)((char *)sample + members_at) = Py_NewRef(members);
        } else if (PyObject_SetAttr(sample, key_name, key) < 0 || PyObject_SetAttr(sample, members_name, members) < 0) {
            Py_DECREF(made);
            return NULL;
        }
    }
    return made;
}

/* The layout tuple (keep, dots, starts, groups, keys, samples), or None; NULL on error. `samples` is the
 * list made_samples() makes when `sample_type` is not None, else None. Releases the grouping. */
static PyObject *grouping_finish(Grouping *g, int ok, PyObject *sample_type) {
    PyObject *layout = NULL;
    if (ok && g->layout_ok) {
        PyObject *made = sample_type == Py_None ? Py_NewRef(Py_None) : made_samples(g, sample_type);
        if (made != NULL) {
            layout = PyTuple_Pack(6, g->keep, g->dots, g->starts, g->groups, g->keys, made);
            Py_DECREF(made);
        }
    } else if (ok) {
        layout = Py_NewRef(Py_None);
    }
    PyMem_Free(g->run);
    for (int k = 0; k < g->ext_cached; k++)
        Py_DECREF(g->ext_str[k]);
    g->ext_cached = 0;
    Py_XDECREF(g->keep);
    Py_XDECREF(g->dots);
    Py_XDECREF(g->starts);
    Py_XDECREF(g->groups);
    Py_XDECREF(g->keys);
    return layout;
}

static PyObject *walk(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view = {0};
    PyObject *source;
    long long offset, file_size;
    Py_ssize_t limit;
    PyTypeObject *member_type;
    PyObject *sample_type = Py_None;
    if (!PyArg_ParseTuple(args, "OLLnO!|O", &source, &offset, &file_size, &limit, &PyType_Type, &member_type,
                          &sample_type))
        return NULL;
    if (!PyType_IsSubtype(member_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "member_type must be a tuple type (tarindex.Member)");
        return NULL;
    }
    if (sample_type != Py_None && !PyType_Check(sample_type)) {
        PyErr_SetString(PyExc_TypeError, "sample_type must be a type (tarindex.Sample) or None");
        return NULL;
    }
    Source src = {0};
    src.fd = -1;
    if (PyLong_Check(source)) { /* a file descriptor */
        src.fd = (int)PyLong_AsLong(source);
        if (src.fd == -1 && PyErr_Occurred())
            return NULL;
        src.win = PyMem_RawMalloc(WINDOW_MAX + BLOCK);
        if (src.win == NULL)
            return PyErr_NoMemory();
    } else {
        if (PyObject_GetBuffer(source, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        src.buf = view.buf;
        if (file_size > view.len)
            file_size = view.len;
    }
    src.file_size = file_size;
    src.want = 4 * WINDOW_MIN;
    src.slack = SLACK_START;
    Records out = {0};
    Py_ssize_t count = 0;
    int64_t stop = offset;
    int nomem = 0;
    if (offset >= 0 && limit > 0) {
        Py_BEGIN_ALLOW_THREADS
        count = walk_headers(&src, offset, limit, &out, &stop, &nomem);
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(src.win);
    PyObject *result = NULL, *names = NULL, *heads = NULL, *datas = NULL, *sizes = NULL, *regular = NULL,
             *mtimes = NULL, *layout = NULL;
    Grouping g;
    int grouping = 0, suspect = 0;
    PyObject *last_mtime = NULL;
    long long last_mtime_value = 0;
    if (nomem) {
        PyErr_NoMemory();
        goto done;
    }
    grouping = 1;
    if (grouping_start(&g, count) < 0)
        goto done;
    names = PyList_New(count);
    heads = PyList_New(count);
    datas = PyList_New(count);
    sizes = PyList_New(count);
    regular = PyList_New(count);
    mtimes = PyList_New(count);
    if (!names || !heads || !datas || !sizes || !regular || !mtimes)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        const Rec *r = &out.recs[i];
        const unsigned char *name = out.text.data + r->text_at + r->pax_mtime_len;
        int n = r->name_len;
        PyObject *text = PyUnicode_DecodeUTF8((const char *)name, n, "surrogateescape");
        if (text == NULL)
            goto done;
        PyList_SET_ITEM(names, i, text);
        if (name[0] == '/' || memmem(name, (size_t)n, "..", 2) != NULL)
            suspect = 1; /* an absolute name or one that may climb out: Python checks each name */
        PyObject *head = PyLong_FromLongLong(r->head), *data = PyLong_FromLongLong(r->header + BLOCK),
                 *size = PyLong_FromLongLong(r->size), *mtime;
        if (r->pax_mtime_len > 0) { /* int(float(text)), as Python spells it */
            char digits[48];
            memcpy(digits, out.text.data + r->text_at, (size_t)r->pax_mtime_len);
            digits[r->pax_mtime_len] = 0;
            double value = PyOS_string_to_double(digits, NULL, NULL);
            mtime = (value == -1.0 && PyErr_Occurred()) ? NULL : PyLong_FromDouble(value);
        } else if (last_mtime != NULL && r->mtime == last_mtime_value) {
            mtime = Py_NewRef(last_mtime); /* members written in the same second share one int */
        } else {
            mtime = PyLong_FromLongLong(r->mtime);
            if (mtime != NULL) {
                Py_XSETREF(last_mtime, Py_NewRef(mtime));
                last_mtime_value = r->mtime;
            }
        }
        if (head)
            PyList_SET_ITEM(heads, i, head);
        if (data)
            PyList_SET_ITEM(datas, i, data);
        if (size)
            PyList_SET_ITEM(sizes, i, size);
        if (mtime)
            PyList_SET_ITEM(mtimes, i, mtime);
        if (!head || !data || !size || !mtime)
            goto done;
        int ends_in_slash = name[n - 1] == '/';
        PyObject *reg = ends_in_slash ? Py_False : Py_True;
        Py_INCREF(reg);
        PyList_SET_ITEM(regular, i, reg);
        if (group_one(&g, i, name, n, ends_in_slash, text, data, size, head, mtime, member_type) < 0)
            goto done;
    }
    layout = grouping_finish(&g, 1, sample_type);
    grouping = 0;
    if (layout == NULL)
        goto done;
    result = Py_BuildValue("(LOOOOOOOOO)", (long long)stop, (count == limit) ? Py_True : Py_False, names, heads,
                           datas, sizes, regular, mtimes, layout, suspect ? Py_True : Py_False);
done:
    if (grouping)
        grouping_finish(&g, 0, Py_None);
    Py_XDECREF(last_mtime);
    records_free(&out);
    Py_XDECREF(names);
    Py_XDECREF(heads);
    Py_XDECREF(datas);
    Py_XDECREF(sizes);
    Py_XDECREF(regular);
    Py_XDECREF(mtimes);
    Py_XDECREF(layout);
    if (view.obj != NULL)
        PyBuffer_Release(&view);
    return result;
}

/* group(names, heads, datas, sizes, mtimes, member_type[, sample_type]) -> layout or None: the grouping of members given
 * as columns (a manifest's member_offsets), as walk() makes it for the members it reads. */
static PyObject *group(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *names, *heads, *datas, *sizes, *mtimes;
    PyTypeObject *member_type;
    PyObject *sample_type = Py_None;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!|O", &PyList_Type, &names, &PyList_Type, &heads, &PyList_Type, &datas,
                          &PyList_Type, &sizes, &PyList_Type, &mtimes, &PyType_Type, &member_type, &sample_type))
        return NULL;
    if (sample_type != Py_None && !PyType_Check(sample_type)) {
        PyErr_SetString(PyExc_TypeError, "sample_type must be a type (tarindex.Sample) or None");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(names);
    if (!PyType_IsSubtype(member_type, &PyTuple_Type) || PyList_GET_SIZE(heads) != count
        || PyList_GET_SIZE(datas) != count || PyList_GET_SIZE(sizes) != count || PyList_GET_SIZE(mtimes) != count) {
        PyErr_SetString(PyExc_ValueError, "columns of different lengths, or member_type not a tuple type");
        return NULL;
    }
    Grouping g;
    if (grouping_start(&g, count) < 0) {
        grouping_finish(&g, 0, Py_None);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *text = PyList_GET_ITEM(names, i);
        Py_ssize_t n;
        const char *name = PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &n) : NULL;
        if (name == NULL) {
            PyErr_Clear(); /* not text, or not encodable: Python groups it (and says what is wrong) */
            g.layout_ok = 0;
            break;
        }
        if (n == 0 || n >= BLOCK) {
            g.layout_ok = 0;
            break;
        }
        int ends_in_slash = name[n - 1] == '/';
        if (group_one(&g, i, (const unsigned char *)name, (int)n, ends_in_slash, text, PyList_GET_ITEM(datas, i),
                      PyList_GET_ITEM(sizes, i), PyList_GET_ITEM(heads, i), PyList_GET_ITEM(mtimes, i),
                      member_type) < 0) {
            grouping_finish(&g, 0, Py_None);
            return NULL;
        }
        if (!g.layout_ok)
            break;
    }
    if (!g.layout_ok) { /* keep[] may hold NULL slots: never handed out */
        grouping_finish(&g, 0, Py_None);
        Py_RETURN_NONE;
    }
    return grouping_finish(&g, 1, sample_type);
}

/* count(fd, file_size) -> (stop, keys, kinds, signatures, skipped) or None: the samples of a whole tar
 * without a Python object per member, for callers that need only how many samples there are, their keys
 * and which extensions each has (reorganize_tar placing inputs it does not copy from).
 *
 *   stop        byte offset where the walk stopped: the caller checks that the archive ends there cleanly
 *               (else it indexes the tar in full, which reports the damage or parses what the walk left)
 *   keys        every sample's key, in stored order
 *   kinds       bytes: per sample, the index into signatures of its extension list
 *   signatures  tuples of the extensions of a sample's members, as stored and in order
 *   skipped     members skipped as tarindex.group_members skips them (metadata, key-less)
 *
 * Grouping is tarindex.group_members' member-by-member rule (a new sample at a new key or at an extension
 * the current sample already has, case-folded). None where this pass does not decide exactly as the full
 * index would: a name that is not ASCII or may be unsafe ('/' first, ".."), a sample of more than MAX_RUN
 * members, more than 255 distinct extension lists. */
#define COUNT_STEP 4096 /* members walked per round (their records reused) */
#define MAX_KINDS 255

typedef struct {
    Bytes keys;        /* every key's bytes, one after another */
    Bytes key_ends;    /* int64 end offsets into keys */
    Bytes kinds;       /* one byte per sample */
    Bytes sig;         /* the current sample's extensions as stored, each followed by '/' */
    Bytes sigs;        /* the distinct signatures, each followed by NUL */
    int64_t sig_at[MAX_KINDS + 1];
    int nsigs, last_sig, open, run_len, key_len;
    unsigned char key[BLOCK];
    Ext run[MAX_RUN]; /* the current sample's extensions, lowered */
    int64_t skipped;
} Counter;

/* Closes the current sample: its signature's index into kinds. 0 ok, 1 give up, -1 no memory. */
static int close_sample(Counter *c) {
    if (!c->open)
        return 0;
    c->open = 0;
    int found = -1;
    if (c->last_sig >= 0) {
        int64_t at = c->sig_at[c->last_sig], end = c->sig_at[c->last_sig + 1] - 1;
        if ((size_t)(end - at) == c->sig.len && memcmp(c->sigs.data + at, c->sig.data, c->sig.len) == 0)
            found = c->last_sig;
    }
    for (int k = 0; found < 0 && k < c->nsigs; k++) {
        int64_t at = c->sig_at[k], end = c->sig_at[k + 1] - 1;
        if ((size_t)(end - at) == c->sig.len && memcmp(c->sigs.data + at, c->sig.data, c->sig.len) == 0)
            found = k;
    }
    if (found < 0) {
        if (c->nsigs == MAX_KINDS)
            return 1;
        if (bytes_put(&c->sigs, c->sig.data, c->sig.len) < 0 || bytes_put(&c->sigs, "", 1) < 0)
            return -1;
        found = c->nsigs++;
        c->sig_at[c->nsigs] = (int64_t)c->sigs.len;
    }
    c->last_sig = found;
    unsigned char kind = (unsigned char)found;
    return bytes_put(&c->kinds, &kind, 1) < 0 ? -1 : 0;
}

/* One member into the counter. 0 ok, 1 give up (see count()), -1 no memory. */
static int count_one(Counter *c, const unsigned char *name, int n) {
    if (n <= 0 || n >= BLOCK || name[0] == '/' || memmem(name, (size_t)n, "..", 2) != NULL)
        return 1;
    NameParts parts = name_parts(name, n);
    int last_slash = parts.last_slash, dot = parts.dot;
    if (!parts.ascii)
        return 1;
    if (name[n - 1] == '/') { /* not regular */
        c->skipped++;
        return 0;
    }
    if (dot <= last_slash + 1 || dot == n - 1 || parts.metadata) {
        c->skipped++;
        return 0;
    }
    int ext_len = n - dot - 1;
    Ext lowered;
    lowered.len = ext_len;
    for (int k = 0; k < ext_len; k++) {
        unsigned char ch = name[dot + 1 + k];
        lowered.text[k] = (ch >= 'A' && ch <= 'Z') ? ch + 32 : ch;
    }
    int same = c->open && dot == c->key_len && memcmp(c->key, name, (size_t)dot) == 0;
    for (int k = 0; same && k < c->run_len; k++)
        if (c->run[k].len == ext_len && memcmp(c->run[k].text, lowered.text, (size_t)ext_len) == 0)
            same = 0; /* a repeated extension starts a new sample */
    if (!same) {
        int closed = close_sample(c);
        if (closed)
            return closed;
        int64_t end;
        memcpy(c->key, name, (size_t)dot);
        c->key_len = dot;
        c->run_len = 0;
        c->sig.len = 0;
        c->open = 1;
        if (bytes_put(&c->keys, name, (size_t)dot) < 0)
            return -1;
        end = (int64_t)c->keys.len;
        if (bytes_put(&c->key_ends, &end, sizeof end) < 0)
            return -1;
    } else if (c->run_len == MAX_RUN) {
        return 1;
    }
    c->run[c->run_len++] = lowered;
    if (bytes_put(&c->sig, name + dot + 1, (size_t)ext_len) < 0 || bytes_put(&c->sig, "/", 1) < 0)
        return -1;
    return 0;
}

static PyObject *count(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    long long file_size;
    if (!PyArg_ParseTuple(args, "iL", &fd, &file_size))
        return NULL;
    Source src = {0};
    src.fd = fd;
    src.file_size = file_size;
    src.want = 4 * WINDOW_MIN;
    src.slack = SLACK_START;
    src.win = PyMem_RawMalloc(WINDOW_MAX + BLOCK);
    Counter *c = PyMem_RawCalloc(1, sizeof(Counter));
    Records out = {0};
    int64_t stop = 0;
    int nomem = 0, outcome = 0;
    if (src.win == NULL || c == NULL) {
        PyMem_RawFree(src.win);
        PyMem_RawFree(c);
        return PyErr_NoMemory();
    }
    c->last_sig = -1;
    Py_BEGIN_ALLOW_THREADS
    int64_t offset = 0;
    for (;;) {
        out.text.len = 0; /* this round's records reuse the last round's memory */
        Py_ssize_t got = walk_headers(&src, offset, COUNT_STEP, &out, &stop, &nomem);
        for (Py_ssize_t i = 0; i < got && outcome == 0; i++)
            outcome = count_one(c, out.text.data + out.recs[i].text_at + out.recs[i].pax_mtime_len,
                                out.recs[i].name_len);
        if (nomem || outcome != 0 || got < COUNT_STEP)
            break;
        offset = stop;
    }
    if (!nomem && outcome == 0)
        outcome = close_sample(c);
    Py_END_ALLOW_THREADS
    records_free(&out);
    PyMem_RawFree(src.win);
    PyObject *result = NULL, *keys = NULL, *kinds = NULL, *sigs = NULL;
    if (nomem || outcome < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (outcome > 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t samples = (Py_ssize_t)c->kinds.len;
    const int64_t *ends = (const int64_t *)c->key_ends.data;
    keys = PyList_New(samples);
    kinds = PyBytes_FromStringAndSize((const char *)c->kinds.data, samples);
    sigs = PyList_New(c->nsigs);
    if (!keys || !kinds || !sigs)
        goto done;
    for (Py_ssize_t i = 0; i < samples; i++) {
        int64_t at = i ? ends[i - 1] : 0;
        PyObject *key = PyUnicode_DecodeASCII((const char *)c->keys.data + at, (Py_ssize_t)(ends[i] - at), NULL);
        if (key == NULL)
            goto done;
        PyList_SET_ITEM(keys, i, key);
    }
    for (int k = 0; k < c->nsigs; k++) {
        const char *text = (const char *)c->sigs.data + c->sig_at[k];
        Py_ssize_t len = (Py_ssize_t)(c->sig_at[k + 1] - c->sig_at[k] - 1), parts = 0;
        for (Py_ssize_t i = 0; i < len; i++)
            parts += text[i] == '/';
        PyObject *exts = PyTuple_New(parts);
        if (exts == NULL)
            goto done;
        PyList_SET_ITEM(sigs, k, exts);
        Py_ssize_t from = 0, part = 0;
        for (Py_ssize_t i = 0; i < len; i++)
            if (text[i] == '/') {
                PyObject *ext = PyUnicode_DecodeASCII(text + from, i - from, NULL);
                if (ext == NULL)
                    goto done;
                PyTuple_SET_ITEM(exts, part++, ext);
                from = i + 1;
            }
    }
    result = Py_BuildValue("(LOOOL)", (long long)stop, keys, kinds, sigs, (long long)c->skipped);
done:
    Py_XDECREF(keys);
    Py_XDECREF(kinds);
    Py_XDECREF(sigs);
    free(c->keys.data);
    free(c->key_ends.data);
    free(c->kinds.data);
    free(c->sig.data);
    free(c->sigs.data);
    PyMem_RawFree(c);
    return result;
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS,
     "count(fd, file_size) -> (stop, keys, kinds, signatures, skipped) or None: a whole tar's samples without "
     "an object per member (see the module source)."},
    {"group", group, METH_VARARGS,
     "group(names, heads, datas, sizes, mtimes, member_type[, sample_type]) -> (keep, dots, starts, groups, keys, "
     "samples) or None: "
     "the grouping of members given as columns, as walk() makes it."},
    {"walk", walk, METH_VARARGS,
     "walk(fd or buffer, offset, file_size, limit, member_type[, sample_type]) -> (stop, full, names, heads, datas, "
     "sizes, regular, mtimes, layout, suspect): the plain member headers from offset (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tarwalk",
                                    "Compiled tar header walker of airflow_provider_mmprep.tarindex.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__tarwalk(void) { return PyModule_Create(&module); }
