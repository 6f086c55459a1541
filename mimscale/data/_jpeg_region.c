/*
 * Decode only a rectangle of a baseline or progressive JPEG, through libjpeg-turbo's libjpeg API.
 *
 * Why: RandomResizedCrop keeps on average ~60% of an image's area, yet a full decode pays the
 * inverse DCT, chroma upsampling and colour conversion for every pixel. libjpeg-turbo (>= 1.5) can
 * skip rows above the crop (jpeg_skip_scanlines: entropy decoding only), restrict the output to the
 * crop's columns (jpeg_crop_scanline: IDCT/upsampling/colour for those iMCU columns only) and stop
 * after the crop's last row (no work at all below it). On ImageNet-sized photographs this makes the
 * decode ~25% cheaper and removes the crop copy (benchmarks/data_pipeline.py).
 *
 * Errors never terminate the process: libjpeg's error_exit is replaced by a longjmp back here, and
 * (like simplejpeg's strict mode) any warning about corrupt data is an error too, so the Python side
 * can fall back to PIL, which handles the odd files the way a torchvision pipeline would.
 *
 * Python API (module mimscale.data._jpeg_region):
 *   decode_region(data, top, left, height, width, denom, out, fast) -> None
 *     data: bytes-like JPEG; the rectangle (top, left, height, width) is in the coordinates of the
 *     image decoded at scale 1/denom (denom in 1, 2, 4, 8); out: writable contiguous buffer of at
 *     least height * width * 3 bytes, which receives the rectangle as packed RGB rows (HWC).
 *     fast: libjpeg-turbo's fast integer IDCT and merged upsampling. Raises ValueError for undecodable data, a colour space other than
 *     YCbCr/grayscale/RGB, or a rectangle outside the image; BufferError if out is too small.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
    int failed;
} RegionError;

static void region_error_exit(j_common_ptr cinfo) {
    RegionError *err = (RegionError *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void region_emit_message(j_common_ptr cinfo, int level) {
    /* level -1: a warning about corrupt data; strict decoding treats it as an error. */
    if (level < 0) {
        RegionError *err = (RegionError *)cinfo->err;
        (*cinfo->err->format_message)(cinfo, err->message);
        longjmp(err->jump, 1);
    }
}

typedef enum { REGION_OK = 0, REGION_LIBJPEG, REGION_COLORSPACE, REGION_BOUNDS, REGION_BUFFER } RegionStatus;

typedef struct {
    const unsigned char *data;
    unsigned long size;
    long top, left, height, width;
    int denom, fast;
    unsigned char *out;
    Py_ssize_t out_size;
    /* results */
    long image_h, image_w;
    char message[JMSG_LENGTH_MAX];
} RegionJob;

static RegionStatus decode_region_impl(RegionJob *job) {
    struct jpeg_decompress_struct cinfo;
    RegionError err;
    /* Touched after setjmp: volatile so a longjmp cannot leave a stale register copy. */
    volatile RegionStatus status = REGION_OK;

    memset(&cinfo, 0, sizeof(cinfo));
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = region_error_exit;
    err.pub.emit_message = region_emit_message;
    err.message[0] = '\0';
    if (setjmp(err.jump)) {
        strncpy(job->message, err.message, sizeof(job->message) - 1);
        job->message[sizeof(job->message) - 1] = '\0';
        jpeg_destroy_decompress(&cinfo);
        return status == REGION_OK ? REGION_LIBJPEG : status;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, job->data, job->size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
        cinfo.jpeg_color_space != JCS_RGB) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_COLORSPACE;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)job->denom;
    cinfo.dct_method = job->fast ? JDCT_IFAST : JDCT_ISLOW;
    cinfo.do_fancy_upsampling = job->fast ? FALSE : TRUE;
    jpeg_calc_output_dimensions(&cinfo);
    job->image_h = (long)cinfo.output_height;
    job->image_w = (long)cinfo.output_width;
    if (job->top < 0 || job->left < 0 || job->height <= 0 || job->width <= 0 ||
        job->top + job->height > job->image_h || job->left + job->width > job->image_w) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_BOUNDS;
    }
    jpeg_start_decompress(&cinfo);
    /* Smoothed ("fancy") chroma upsampling reads one chroma sample beyond each output pixel, and
     * jpeg_crop_scanline treats its span's right end as the image edge; so the span runs on to the
     * next iMCU column boundary and one more iMCU column (or the image edge), which keeps every
     * pixel of the rectangle identical to a full decode. Likewise on the left: the span starts one
     * pixel early, which libjpeg rounds down to an iMCU boundary, so a rectangle that starts on a
     * boundary gets the whole iMCU column before it as context. */
    const long imcu = (long)cinfo.min_DCT_scaled_size * (long)cinfo.max_h_samp_factor;
    long right = ((job->left + job->width + imcu - 1) / imcu + 1) * imcu;
    if (right > job->image_w) right = job->image_w;
    const long start = job->left > 0 ? job->left - 1 : 0;
    JDIMENSION xoffset = (JDIMENSION)start, cropped = (JDIMENSION)(right - start);
    if (cropped < cinfo.output_width) {
        /* Widens the span to whole iMCU columns: xoffset moves left, the width grows. */
        jpeg_crop_scanline(&cinfo, &xoffset, &cropped);
    } else {
        xoffset = 0;
        cropped = cinfo.output_width;
    }
    const long out_row = job->width * 3, span_row = (long)cropped * 3;
    const long shift = (job->left - (long)xoffset) * 3;
    if ((Py_ssize_t)span_row * job->height > job->out_size) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_BUFFER;
    }
    if (job->top > 0) {
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)job->top);
    }
    /* libjpeg writes the widened span straight into `out`, one row after another... */
    const JDIMENSION end = (JDIMENSION)(job->top + job->height);
    while (cinfo.output_scanline < end) {
        JSAMPROW row = job->out + (long)(cinfo.output_scanline - (JDIMENSION)job->top) * span_row;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    /* ...then the rectangle's own pixels are packed in place (each row moves to a lower address, so
     * front-to-back order never overwrites a row not yet moved); the resize reads packed rows faster. */
    if (span_row != out_row) {
        for (long r = 0; r < job->height; r++) {
            memmove(job->out + r * out_row, job->out + r * span_row + shift, (size_t)out_row);
        }
    }
    /* Nothing below the crop is needed: abort instead of finishing (no entropy decoding of the rest). */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return REGION_OK;
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    long top, left, height, width;
    int denom, fast;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*lllliw*p", &data, &top, &left, &height, &width, &denom, &out, &fast)) {
        return NULL;
    }
    if (denom != 1 && denom != 2 && denom != 4 && denom != 8) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "denom must be 1, 2, 4 or 8, got %d", denom);
    }
    RegionJob job;
    memset(&job, 0, sizeof(job));
    job.data = (const unsigned char *)data.buf;
    job.size = (unsigned long)data.len;
    job.top = top;
    job.left = left;
    job.height = height;
    job.width = width;
    job.denom = denom;
    job.fast = fast;
    job.out = (unsigned char *)out.buf;
    job.out_size = out.len;
    RegionStatus status;
    Py_BEGIN_ALLOW_THREADS
    status = decode_region_impl(&job);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    switch (status) {
    case REGION_OK:
        Py_RETURN_NONE;
    case REGION_COLORSPACE:
        return PyErr_Format(PyExc_ValueError, "JPEG colour space is not YCbCr, grayscale or RGB (CMYK/YCCK)");
    case REGION_BOUNDS:
        return PyErr_Format(PyExc_ValueError,
                            "region top=%ld left=%ld height=%ld width=%ld lies outside the %ldx%ld image "
                            "(decoded at 1/%d)",
                            top, left, height, width, job.image_h, job.image_w, denom);
    case REGION_BUFFER:
        return PyErr_Format(PyExc_BufferError, "output buffer holds %zd bytes, the region needs %ld",
                            out.len, width * 3 * height);
    default:
        return PyErr_Format(PyExc_ValueError, "libjpeg: %s", job.message);
    }
}

static PyObject *libjpeg_version(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef LIBJPEG_TURBO_VERSION
#define REGION_STR2(x) #x
#define REGION_STR(x) REGION_STR2(x)
    return PyUnicode_FromString("libjpeg-turbo " REGION_STR(LIBJPEG_TURBO_VERSION));
#else
    return PyUnicode_FromFormat("libjpeg %d", JPEG_LIB_VERSION);
#endif
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, top, left, height, width, denom, out, fast) -> None: the rectangle, packed RGB"},
    {"libjpeg_version", libjpeg_version, METH_NOARGS, "The libjpeg headers this module was built against."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg_region",
    "Decode a rectangle of a JPEG with libjpeg-turbo (skip rows above, crop columns, stop below).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
