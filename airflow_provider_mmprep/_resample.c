/* Pillow 13's 8-bit separable resample (BOX filter) for RGBX pixels, bit for bit, with SSE4.1 per pixel.
 *
 * download_images' resizer decodes JPEGs with libjpeg-turbo straight into RGBX rows (simplejpeg) and shrinks
 * them here. The arithmetic is Pillow's (src/libImaging/Resample.c, HPND licence: coefficients computed in
 * double from float box edges, normalised to 22-bit fixed point, the horizontal pass first over the rows the
 * vertical pass needs unless the height shrinks more than twice as much as the width, each pass rounding to
 * 8 bits and clamping), so the pixels equal those of
 * ``Image.resize(size, Image.Resampling.BOX, box=box, reducing_gap=None)`` on the same RGB image; what
 * differs is the inner loop: Pillow multiplies one channel at a time, here one 4-channel pixel is one vector
 * operation (pmovzxbd, pmulld, paddd), which makes the resample several times cheaper. Machines without
 * SSE4.1 (or not x86) run the scalar loop, same results.
 *
 * box_rgbx(src, width, height, out_width, out_height, x0, y0, x1, y1) -> bytes
 *   src: a buffer of height rows of width RGBX pixels; returns out_height rows of out_width RGBX pixels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_SSE41_PATH 1
#include <immintrin.h>
#endif

#define PRECISION_BITS (32 - 8 - 2)

static double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

/* Pillow's precompute_coeffs with the BOX filter (support 0.5), then normalize_coeffs_8bpc. Returns ksize,
 * 0 on allocation failure. */
static int precompute_coeffs(int inSize, float in0, float in1, int outSize, int **boundsp, int32_t **kkp) {
    double support, scale, filterscale;
    int xx, x, ksize, xmin, xmax;
    int *bounds;
    double *kk, *k;
    int32_t *ik;

    filterscale = scale = (double)(in1 - in0) / outSize;
    if (filterscale < 1.0) {
        filterscale = 1.0;
    }
    support = 0.5 * filterscale;
    ksize = (int)ceil(support) * 2 + 1;
    if (outSize > INT_MAX / (ksize * (int)sizeof(double))) {
        return 0;
    }
    kk = malloc((size_t)outSize * ksize * sizeof(double));
    bounds = malloc((size_t)outSize * 2 * sizeof(int));
    if (!kk || !bounds) {
        free(kk);
        free(bounds);
        return 0;
    }
    double inv_filterscale = 1.0 / filterscale;
    for (xx = 0; xx < outSize; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        xmin = (int)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        xmax = (int)(center + support + 0.5);
        if (xmax > inSize) {
            xmax = inSize;
        }
        xmax -= xmin;
        k = &kk[xx * ksize];
        for (x = 0; x < xmax; x++) {
            double w = box_filter((x + xmin - center + 0.5) * inv_filterscale);
            k[x] = w;
            ww += w;
        }
        if (ww != 0.0) {
            for (x = 0; x < xmax; x++) {
                k[x] /= ww;
            }
        }
        for (; x < ksize; x++) {
            k[x] = 0;
        }
        bounds[xx * 2 + 0] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    /* normalize_coeffs_8bpc, in place as Pillow does (int32 over the doubles' storage) */
    ik = (int32_t *)kk;
    for (x = 0; x < outSize * ksize; x++) {
        double value = kk[x];
        ik[x] = value < 0 ? (int)(-0.5 + value * (1 << PRECISION_BITS))
                          : (int)(0.5 + value * (1 << PRECISION_BITS));
    }
    *boundsp = bounds;
    *kkp = ik;
    return ksize;
}

static inline uint8_t clip8(int32_t in) {
    int32_t v = in >> PRECISION_BITS;
    return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

/* --- scalar passes (Pillow's loops, all four bytes of a pixel) */
static void horizontal_scalar(uint8_t *out, const uint8_t *in, int in_width, int out_width, int rows, int first_row,
                              int ksize, const int *bounds, const int32_t *kk) {
    for (int yy = 0; yy < rows; yy++) {
        const uint8_t *line = in + (size_t)(yy + first_row) * in_width * 4;
        uint8_t *lineOut = out + (size_t)yy * out_width * 4;
        for (int xx = 0; xx < out_width; xx++) {
            int xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
            const int32_t *k = &kk[xx * ksize];
            int32_t s0, s1, s2, s3;
            s0 = s1 = s2 = s3 = 1 << (PRECISION_BITS - 1);
            for (int x = 0; x < xmax; x++) {
                const uint8_t *p = line + (size_t)(x + xmin) * 4;
                s0 += p[0] * k[x];
                s1 += p[1] * k[x];
                s2 += p[2] * k[x];
                s3 += p[3] * k[x];
            }
            lineOut[xx * 4 + 0] = clip8(s0);
            lineOut[xx * 4 + 1] = clip8(s1);
            lineOut[xx * 4 + 2] = clip8(s2);
            lineOut[xx * 4 + 3] = clip8(s3);
        }
    }
}

static void vertical_scalar(uint8_t *out, const uint8_t *in, int width, int out_height, int ksize,
                            const int *bounds, const int32_t *kk) {
    size_t stride = (size_t)width * 4;
    for (int yy = 0; yy < out_height; yy++) {
        int ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1];
        const int32_t *k = &kk[yy * ksize];
        uint8_t *lineOut = out + (size_t)yy * stride;
        for (size_t i = 0; i < stride; i++) {
            int32_t s = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < ymax; y++) {
                s += in[(size_t)(y + ymin) * stride + i] * k[y];
            }
            lineOut[i] = clip8(s);
        }
    }
}

#ifdef HAVE_SSE41_PATH
/* One RGBX pixel per vector: widen its 4 bytes to 4 int32, multiply by the tap's coefficient, add. The final
 * arithmetic shift and the two saturating packs clamp exactly as clip8. */
__attribute__((target("sse4.1"))) static inline __m128i load_pixel(const uint8_t *p) {
    int32_t word;
    memcpy(&word, p, 4);
    return _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word));
}

__attribute__((target("sse4.1"))) static inline void store_pixel(uint8_t *p, __m128i acc) {
    __m128i v = _mm_srai_epi32(acc, PRECISION_BITS);
    v = _mm_packs_epi32(v, v);
    v = _mm_packus_epi16(v, v);
    int32_t word = _mm_cvtsi128_si32(v);
    memcpy(p, &word, 4);
}

__attribute__((target("sse4.1"))) static void horizontal_sse41(uint8_t *out, const uint8_t *in, int in_width,
                                                               int out_width, int rows, int first_row, int ksize,
                                                               const int *bounds, const int32_t *kk) {
    const __m128i initial = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
    for (int yy = 0; yy < rows; yy++) {
        const uint8_t *line = in + (size_t)(yy + first_row) * in_width * 4;
        uint8_t *lineOut = out + (size_t)yy * out_width * 4;
        for (int xx = 0; xx < out_width; xx++) {
            int xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
            const int32_t *k = &kk[xx * ksize];
            const uint8_t *p = line + (size_t)xmin * 4;
            __m128i acc = initial;
            for (int x = 0; x < xmax; x++) {
                acc = _mm_add_epi32(acc, _mm_mullo_epi32(load_pixel(p + x * 4), _mm_set1_epi32(k[x])));
            }
            store_pixel(lineOut + xx * 4, acc);
        }
    }
}

__attribute__((target("sse4.1"))) static void vertical_sse41(uint8_t *out, const uint8_t *in, int width,
                                                             int out_height, int ksize, const int *bounds,
                                                             const int32_t *kk) {
    const __m128i initial = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
    size_t stride = (size_t)width * 4;
    for (int yy = 0; yy < out_height; yy++) {
        int ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1];
        const int32_t *k = &kk[yy * ksize];
        const uint8_t *top = in + (size_t)ymin * stride;
        uint8_t *lineOut = out + (size_t)yy * stride;
        int xx = 0;
        for (; xx + 4 <= width; xx += 4) {  /* four pixels: one 16-byte load per tap */
            __m128i acc0 = initial, acc1 = initial, acc2 = initial, acc3 = initial;
            for (int y = 0; y < ymax; y++) {
                __m128i row = _mm_loadu_si128((const __m128i *)(top + (size_t)y * stride + (size_t)xx * 4));
                __m128i coefficient = _mm_set1_epi32(k[y]);
                acc0 = _mm_add_epi32(acc0, _mm_mullo_epi32(_mm_cvtepu8_epi32(row), coefficient));
                acc1 = _mm_add_epi32(acc1, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(row, 4)), coefficient));
                acc2 = _mm_add_epi32(acc2, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(row, 8)), coefficient));
                acc3 = _mm_add_epi32(acc3, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(row, 12)), coefficient));
            }
            __m128i low = _mm_packs_epi32(_mm_srai_epi32(acc0, PRECISION_BITS), _mm_srai_epi32(acc1, PRECISION_BITS));
            __m128i high = _mm_packs_epi32(_mm_srai_epi32(acc2, PRECISION_BITS), _mm_srai_epi32(acc3, PRECISION_BITS));
            _mm_storeu_si128((__m128i *)(lineOut + (size_t)xx * 4), _mm_packus_epi16(low, high));
        }
        for (; xx < width; xx++) {
            __m128i acc = initial;
            for (int y = 0; y < ymax; y++) {
                acc = _mm_add_epi32(acc, _mm_mullo_epi32(load_pixel(top + (size_t)y * stride + (size_t)xx * 4),
                                                         _mm_set1_epi32(k[y])));
            }
            store_pixel(lineOut + (size_t)xx * 4, acc);
        }
    }
}
#endif

static int use_simd(void) {
#ifdef HAVE_SSE41_PATH
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("sse4.1") ? 1 : 0;
    }
    return known;
#else
    return 0;
#endif
}

static void horizontal_pass(uint8_t *out, const uint8_t *in, int in_width, int out_width, int rows, int first_row,
                            int ksize, const int *bounds, const int32_t *kk, int simd) {
#ifdef HAVE_SSE41_PATH
    if (simd) {
        horizontal_sse41(out, in, in_width, out_width, rows, first_row, ksize, bounds, kk);
        return;
    }
#endif
    (void)simd;
    horizontal_scalar(out, in, in_width, out_width, rows, first_row, ksize, bounds, kk);
}

static void vertical_pass(uint8_t *out, const uint8_t *in, int width, int out_height, int ksize, const int *bounds,
                          const int32_t *kk, int simd) {
#ifdef HAVE_SSE41_PATH
    if (simd) {
        vertical_sse41(out, in, width, out_height, ksize, bounds, kk);
        return;
    }
#endif
    (void)simd;
    vertical_scalar(out, in, width, out_height, ksize, bounds, kk);
}

static PyObject *box_rgbx(PyObject *self, PyObject *args) {
    Py_buffer view;
    int width, height, xsize, ysize, simd = -1;
    float box[4];
    if (!PyArg_ParseTuple(args, "y*iiii(ffff)|p", &view, &width, &height, &xsize, &ysize, &box[0], &box[1],
                          &box[2], &box[3], &simd)) {
        return NULL;
    }
    if (width < 1 || height < 1 || xsize < 1 || ysize < 1 || view.len != (Py_ssize_t)width * height * 4) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "box_rgbx: the buffer is not height x width RGBX pixels");
        return NULL;
    }
    if (simd < 0) {
        simd = use_simd();
    }
    const uint8_t *src = view.buf;
    int need_horizontal = xsize != width || box[0] || box[2] != xsize;
    int need_vertical = ysize != height || box[1] || box[3] != ysize;
    /* Pillow 13: when the height shrinks more than twice as much as the width, the vertical pass runs first */
    int horizontal_first = !((height - ysize) > 0 && (height - ysize) > (width - xsize) * 2);
    int *bounds_vert = NULL, *bounds_horiz = NULL;
    int32_t *kk_vert = NULL, *kk_horiz = NULL;
    int ksize_vert = 0, ksize_horiz = 0, ybox_first = 0, ybox_last = height;
    uint8_t *temp = NULL;
    PyObject *result = NULL;

    if ((need_horizontal && horizontal_first) || need_vertical) {
        ksize_vert = precompute_coeffs(height, box[1], box[3], ysize, &bounds_vert, &kk_vert);
        if (!ksize_vert) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (need_horizontal) {
        if (horizontal_first) {
            ybox_first = bounds_vert[0];
            ybox_last = bounds_vert[ysize * 2 - 2] + bounds_vert[ysize * 2 - 1];
            for (int i = 0; i < ysize; i++) {
                bounds_vert[i * 2] -= ybox_first;
            }
        }
        ksize_horiz = precompute_coeffs(width, box[0], box[2], xsize, &bounds_horiz, &kk_horiz);
        if (!ksize_horiz) {
            PyErr_NoMemory();
            goto done;
        }
    }
    /* the passes that run, in order: (pass, in width, out width, rows out) */
    int first_is_vertical = need_vertical && (!horizontal_first || !need_horizontal);
    int passes = need_horizontal + need_vertical;
    int out_width = need_horizontal ? xsize : width;
    int out_height = need_vertical ? ysize : (need_horizontal ? ybox_last - ybox_first : height);
    if (passes == 2) {
        size_t temp_size = horizontal_first ? (size_t)xsize * (ybox_last - ybox_first) * 4
                                            : (size_t)width * ysize * 4;
        temp = malloc(temp_size + 1);
        if (!temp) {
            PyErr_NoMemory();
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)out_width * out_height * 4);
    if (!result) {
        goto done;
    }
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    if (passes == 0) {
        memcpy(out, src, (size_t)width * height * 4);
    } else if (first_is_vertical) {
        /* vertical over every column of the source, then (if needed) horizontal over the ysize rows */
        uint8_t *vertical_out = passes == 2 ? temp : out;
        vertical_pass(vertical_out, src, width, ysize, ksize_vert, bounds_vert, kk_vert, simd);
        if (passes == 2) {
            horizontal_pass(out, temp, width, xsize, ysize, 0, ksize_horiz, bounds_horiz, kk_horiz, simd);
        }
    } else {
        /* horizontal over the rows the vertical pass needs, then (if needed) vertical */
        uint8_t *horizontal_out = passes == 2 ? temp : out;
        horizontal_pass(horizontal_out, src, width, xsize, ybox_last - ybox_first, ybox_first, ksize_horiz,
                        bounds_horiz, kk_horiz, simd);
        if (passes == 2) {
            vertical_pass(out, temp, xsize, ysize, ksize_vert, bounds_vert, kk_vert, simd);
        }
    }
    Py_END_ALLOW_THREADS

done:
    free(bounds_vert);
    free(kk_vert);
    free(bounds_horiz);
    free(kk_horiz);
    free(temp);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"box_rgbx", box_rgbx, METH_VARARGS,
     "box_rgbx(src, width, height, out_width, out_height, (x0, y0, x1, y1)[, simd]) -> bytes: Pillow's BOX "
     "resample of RGBX pixels, bit for bit (simd: force the SSE4.1 or the scalar loop; default: the CPU's)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resample",
                                    "Pillow's BOX resample of RGBX pixels, vectorised per pixel.", -1, methods};

PyMODINIT_FUNC PyInit__resample(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "SIMD", use_simd()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
