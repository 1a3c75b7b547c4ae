// Decoding only the part of a JPEG that the training crop reads, through libjpeg-turbo: rows
// below the part are never decoded, rows above it are entropy-decoded only, and columns outside
// it skip the inverse DCT and the colour conversion (jpeg_crop_scanline). The pixels are the
// ones a full decode at the same DCT scale gives.
//
// Any error or warning (a corrupt or truncated file, a colour space libjpeg cannot turn into
// RGB) returns a nonzero code and writes nothing the caller keeps: the caller decodes with
// Pillow instead, which names a corrupt file or decodes what libjpeg warned about.

#include <algorithm>
#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include <jpeglib.h>

namespace {

struct Errors {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
};

[[noreturn]] void Fail(j_common_ptr cinfo) {
  std::longjmp(reinterpret_cast<Errors*>(cinfo->err)->jump, 1);
}

void Message(j_common_ptr cinfo, int level) {
  if (level < 0) Fail(cinfo);  // a warning: corrupt data, which Pillow decides about
}

// Runs body(cinfo) on a decompressor reading `data` (size bytes), its header parsed, RGB out:
// body's result, or 1 if libjpeg failed or warned. libjpeg's errors return here by longjmp,
// so body keeps only trivially destructible locals.
template <typename Body>
int WithDecompressor(const uint8_t* data, int64_t size, Body&& body) {
  jpeg_decompress_struct cinfo;
  Errors errors;
  cinfo.err = jpeg_std_error(&errors.mgr);
  errors.mgr.error_exit = Fail;
  errors.mgr.emit_message = Message;
  if (setjmp(errors.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return 1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  const int status = body(cinfo);
  jpeg_destroy_decompress(&cinfo);  // also the rows below a region, never decoded
  return status;
}

}  // namespace

// The width and height of the JPEG in `data` (size bytes). Returns 0, or 1 if the header
// cannot be read.
extern "C" int ShufflenetJpegSize(const uint8_t* data, int64_t size, int64_t* width,
                                  int64_t* height) {
  return WithDecompressor(data, size, [&](jpeg_decompress_struct& cinfo) {
    *width = cinfo.image_width;
    *height = cinfo.image_height;
    return 0;
  });
}

// Decodes rows [row0, row1) and columns [col0, col1) of the JPEG decoded at 1/scale (scale 1,
// 2, 4 or 8, as Pillow's draft) into out: rows `stride` bytes apart, each with room for
// `capacity` RGB pixels. The decoded columns are [*first, *first + *count), which holds
// [col0, col1). Returns 0, 1 for a decoding error or warning, 2 for a region outside the scaled
// image or wider than `capacity` pixels (col1 - col0 + 64 always suffices).
extern "C" int ShufflenetJpegDecodeRegion(const uint8_t* data, int64_t size, int scale,
                                          int64_t row0, int64_t row1, int64_t col0,
                                          int64_t col1, uint8_t* out, int64_t stride,
                                          int64_t capacity, int64_t* first, int64_t* count) {
  return WithDecompressor(data, size, [&](jpeg_decompress_struct& cinfo) {
    cinfo.scale_num = 1;
    cinfo.scale_denom = scale;
    jpeg_start_decompress(&cinfo);
    const int64_t height = cinfo.output_height, width = cinfo.output_width;
    if (row0 < 0 || col0 < 0 || row1 > height || col1 > width || row1 <= row0 || col1 <= col0) {
      return 2;
    }
    // A cropped row's edge pixels are upsampled from chroma without its left or right
    // neighbour, so they differ from a full decode's: 16 more pixels each side (a 4:2:0 block)
    // keep them outside [col0, col1), which then equals Pillow's full decode (tested).
    const int64_t margin = 16;
    const int64_t lo = std::max<int64_t>(col0 - margin, 0), hi = std::min(col1 + margin, width);
    JDIMENSION x = static_cast<JDIMENSION>(lo), w = static_cast<JDIMENSION>(hi - lo);
    jpeg_crop_scanline(&cinfo, &x, &w);
    if (w > capacity) return 2;
    jpeg_skip_scanlines(&cinfo, static_cast<JDIMENSION>(row0));
    for (int64_t y = row0; y < row1; ++y) {
      JSAMPROW row = out + (y - row0) * stride;
      jpeg_read_scanlines(&cinfo, &row, 1);
    }
    *first = x;
    *count = w;
    return 0;
  });
}
