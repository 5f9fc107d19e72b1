// dino/io/plot.hpp: line plots rendered to PNG without Python (loss curves, k-NN curves).
//
// plot_image draws series (x, y) into a width x height RGB image: a title, a framed plot
// area with light grid lines at "nice" ticks (steps 1, 2 or 5 times a power of ten, the axes
// snapped to whole ticks), tick numbers and axis labels in the built-in 5 x 7 font
// (io/font5x7.hpp; the y label reads bottom to top), one anti-aliased line per series in the
// matplotlib "tab10" colours (cycled), round markers when a series has at most 40 points,
// and a legend when any series is named, in the corner of the plot area where it hides the
// fewest line points. plot_png writes the image atomically (io/png.hpp).
//
// A series with an empty x uses x = 0, 1, 2, ...; otherwise x and y must have the same
// length (shape_error). Non-finite points are skipped and break the line. With no finite
// point the axes span [0, 1]; a constant coordinate gets a unit-wide (or 10 %) range.
// Width and height must be at least 200 x 150 (shape_error). Text is drawn at scale 2
// (12-pixel advance) from a 600-pixel-wide image on, scale 1 below.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/io/font5x7.hpp"
#include "dino/io/png.hpp"

namespace dino::io {

/// One line of a plot: name (legend), x and y.
struct series {
  std::string name;
  std::vector<double> x, y;
};

namespace detail {
using rgb3 = std::array<std::uint8_t, 3>;

inline rgb3 series_color(std::size_t i) {
  static constexpr rgb3 tab10[10] = {rgb3{31, 119, 180}, rgb3{255, 127, 14}, rgb3{44, 160, 44},  rgb3{214, 39, 40},
                                     rgb3{148, 103, 189}, rgb3{140, 86, 75},  rgb3{227, 119, 194}, rgb3{127, 127, 127},
                                     rgb3{188, 189, 34},  rgb3{23, 190, 207}};
  return tab10[i % 10];
}

inline void blend(image_u8& img, int x, int y, const rgb3& c, double a) {
  if (x < 0 || y < 0 || x >= img.width || y >= img.height || !(a > 0)) return;
  if (a > 1) a = 1;
  std::uint8_t* p = img.at(x, y);
  for (int k = 0; k < 3; ++k)
    p[k] = static_cast<std::uint8_t>(std::lround(p[k] + a * (double(c[static_cast<std::size_t>(k)]) - p[k])));
}

/// Filled rectangle [x0, x1) x [y0, y1).
inline void fill_rect(image_u8& img, int x0, int y0, int x1, int y1, const rgb3& c) {
  for (int y = std::max(0, y0); y < std::min(img.height, y1); ++y)
    for (int x = std::max(0, x0); x < std::min(img.width, x1); ++x) {
      std::uint8_t* p = img.at(x, y);
      p[0] = c[0], p[1] = c[1], p[2] = c[2];
    }
}

struct clip_box {
  int x0, y0, x1, y1;  // [x0, x1) x [y0, y1)
};

/// An anti-aliased segment of the given width (coverage from the distance of each pixel
/// centre to the segment), clipped to `clip`.
inline void draw_segment(image_u8& img, double ax, double ay, double bx, double by, double width, const rgb3& c,
                         const clip_box& clip) {
  const double hw = 0.5 * width;
  const int x0 = std::max(clip.x0, static_cast<int>(std::floor(std::min(ax, bx) - hw - 1)));
  const int x1 = std::min(clip.x1 - 1, static_cast<int>(std::ceil(std::max(ax, bx) + hw + 1)));
  const int y0 = std::max(clip.y0, static_cast<int>(std::floor(std::min(ay, by) - hw - 1)));
  const int y1 = std::min(clip.y1 - 1, static_cast<int>(std::ceil(std::max(ay, by) + hw + 1)));
  const double dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy;
  for (int y = y0; y <= y1; ++y)
    for (int x = x0; x <= x1; ++x) {
      const double px = x + 0.5 - ax, py = y + 0.5 - ay;
      double t = len2 > 0 ? (px * dx + py * dy) / len2 : 0.0;
      t = std::clamp(t, 0.0, 1.0);
      const double ex = px - t * dx, ey = py - t * dy;
      const double cov = hw + 0.5 - std::sqrt(ex * ex + ey * ey);
      if (cov > 0) blend(img, x, y, c, cov);
    }
}

inline void draw_disc(image_u8& img, double cx, double cy, double r, const rgb3& c, const clip_box& clip) {
  draw_segment(img, cx, cy, cx, cy, 2 * r, c, clip);
}

/// Tick positions covering [lo, hi] with a 1-2-5 step, about `target` intervals.
struct axis_ticks {
  double lo = 0, hi = 1, step = 0.2;
  int decimals = 1;
  bool scientific = false;
  std::vector<double> at;
};

inline axis_ticks nice_ticks(double lo, double hi, int target) {
  if (!(std::isfinite(lo) && std::isfinite(hi))) lo = 0, hi = 1;
  if (hi < lo) std::swap(lo, hi);
  if (hi - lo <= 1e-12 * std::max(1.0, std::fabs(hi))) {
    const double pad = lo == 0 ? 0.5 : 0.05 * std::fabs(lo);
    lo -= pad, hi += pad;
  }
  axis_ticks t;
  const double raw = (hi - lo) / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double n = raw / mag;
  t.step = (n < 1.5 ? 1.0 : n < 3.0 ? 2.0 : n < 7.0 ? 5.0 : 10.0) * mag;
  t.lo = std::floor(lo / t.step + 1e-9) * t.step;
  t.hi = std::ceil(hi / t.step - 1e-9) * t.step;
  const long count = std::lround((t.hi - t.lo) / t.step);
  for (long i = 0; i <= count; ++i) {
    double v = t.lo + double(i) * t.step;
    if (std::fabs(v) < 1e-9 * t.step) v = 0;  // no "-0.0"
    t.at.push_back(v);
  }
  const double big = std::max(std::fabs(t.lo), std::fabs(t.hi));
  t.scientific = big >= 1e7 || t.step < 1e-4;
  t.decimals = std::max(0, -static_cast<int>(std::floor(std::log10(t.step) + 1e-9)));
  return t;
}

inline std::string tick_label(double v, const axis_ticks& t) {
  char buf[64];
  if (t.scientific) std::snprintf(buf, sizeof buf, "%.2g", v);
  else std::snprintf(buf, sizeof buf, "%.*f", t.decimals, v);
  return buf;
}
}  // namespace detail

/// Renders the series into a width x height RGB image (see the header comment).
inline image_u8 plot_image(const std::string& title, const std::string& x_label, const std::string& y_label,
                           const std::vector<series>& data, int width = 800, int height = 500) {
  using detail::rgb3;
  require<shape_error>(width >= 200 && height >= 150, "plot: image size ", width, " x ", height,
                       " is below the minimum 200 x 150");
  for (const series& s : data)
    require<shape_error>(s.x.empty() || s.x.size() == s.y.size(), "plot: series '", s.name, "' has ", s.x.size(),
                         " x values but ", s.y.size(), " y values");
  auto xval = [](const series& s, std::size_t i) { return s.x.empty() ? double(i) : s.x[i]; };

  // Data range over the finite points.
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
  for (const series& s : data)
    for (std::size_t i = 0; i < s.y.size(); ++i) {
      const double x = xval(s, i), y = s.y[i];
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      xmin = std::min(xmin, x), xmax = std::max(xmax, x), ymin = std::min(ymin, y), ymax = std::max(ymax, y);
    }
  if (!std::isfinite(xmin)) xmin = 0, xmax = 1, ymin = 0, ymax = 1;

  const int ts = width >= 600 ? 2 : 1;  // text scale
  const detail::axis_ticks xt = detail::nice_ticks(xmin, xmax, std::max(2, width / (60 * ts + 40)));
  const detail::axis_ticks yt = detail::nice_ticks(ymin, ymax, std::max(2, height / (40 * ts + 20)));
  std::vector<std::string> ylabels;
  int ylab_w = 0;
  for (double v : yt.at) {
    ylabels.push_back(detail::tick_label(v, yt));
    ylab_w = std::max(ylab_w, text_width(ylabels.back(), ts));
  }

  const rgb3 black{0, 0, 0}, dark{60, 60, 60}, grid{228, 228, 228}, frame{90, 90, 90};
  image_u8 img(width, height, 3, 255);
  const int th = text_height(ts), pad = 6 * ts;
  const int left = pad + (y_label.empty() ? 0 : th + pad) + ylab_w + pad + 4 * ts;
  const int top = pad + (title.empty() ? 0 : text_height(ts + 1) + pad);
  const int bottom = height - (pad + (x_label.empty() ? 0 : th + pad) + th + pad + 4 * ts);
  const int right = width - std::max(pad + 4 * ts, text_width(detail::tick_label(xt.hi, xt), ts) / 2 + pad);
  require<shape_error>(right - left >= 40 && bottom - top >= 40, "plot: ", width, " x ", height,
                       " leaves no room for the plot area after the labels");
  const double sx = (right - left) / (xt.hi - xt.lo), sy = (bottom - top) / (yt.hi - yt.lo);
  auto px = [&](double x) { return left + (x - xt.lo) * sx; };
  auto py = [&](double y) { return bottom - (y - yt.lo) * sy; };

  // Grid, ticks and their numbers.
  for (std::size_t i = 0; i < xt.at.size(); ++i) {
    const int x = static_cast<int>(std::lround(px(xt.at[i])));
    detail::fill_rect(img, x, top, x + 1, bottom, grid);
    detail::fill_rect(img, x, bottom, x + 1, bottom + 4 * ts, frame);
    const std::string l = detail::tick_label(xt.at[i], xt);
    draw_text(img, x - text_width(l, ts) / 2, bottom + 4 * ts + pad / 2, l, dark, ts);
  }
  for (std::size_t i = 0; i < yt.at.size(); ++i) {
    const int y = static_cast<int>(std::lround(py(yt.at[i])));
    detail::fill_rect(img, left, y, right, y + 1, grid);
    detail::fill_rect(img, left - 4 * ts, y, left, y + 1, frame);
    draw_text(img, left - 4 * ts - pad / 2 - text_width(ylabels[i], ts), y - font5x7::body_h * ts / 2, ylabels[i], dark,
              ts);
  }
  // Frame.
  detail::fill_rect(img, left, top, right + 1, top + 1, frame);
  detail::fill_rect(img, left, bottom, right + 1, bottom + 1, frame);
  detail::fill_rect(img, left, top, left + 1, bottom + 1, frame);
  detail::fill_rect(img, right, top, right + 1, bottom + 1, frame);

  // Series. Lines and markers may reach a few pixels past the frame, so that points on the
  // axis limits (which are snapped to the data) are not cut in half.
  const double lw = 1.0 + ts * 0.5, mr = 2.0 + ts;
  const int reach = static_cast<int>(std::ceil(mr)) + 1;
  const detail::clip_box clip{left - reach, top - reach, right + reach + 1, bottom + reach + 1};
  std::vector<bool> with_markers(data.size());
  std::vector<std::array<double, 2>> samples;  // points along the lines, for placing the legend
  for (std::size_t si = 0; si < data.size(); ++si) {
    const series& s = data[si];
    const rgb3 c = detail::series_color(si);
    bool have_prev = false;
    double ax = 0, ay = 0;
    std::size_t finite = 0;
    for (std::size_t i = 0; i < s.y.size(); ++i) {
      const double x = xval(s, i), y = s.y[i];
      if (!std::isfinite(x) || !std::isfinite(y)) {
        have_prev = false;
        continue;
      }
      ++finite;
      const double bx = px(x), by = py(y);
      samples.push_back({bx, by});
      if (have_prev) {
        detail::draw_segment(img, ax, ay, bx, by, lw, c, clip);
        const int n = static_cast<int>(std::min(200.0, std::hypot(bx - ax, by - ay) / 4.0));
        for (int k = 1; k < n; ++k) samples.push_back({ax + (bx - ax) * k / n, ay + (by - ay) * k / n});
      }
      ax = bx, ay = by, have_prev = true;
    }
    with_markers[si] = finite <= 40;
    if (with_markers[si])
      for (std::size_t i = 0; i < s.y.size(); ++i)
        if (std::isfinite(xval(s, i)) && std::isfinite(s.y[i]))
          detail::draw_disc(img, px(xval(s, i)), py(s.y[i]), mr, c, clip);
  }

  // Legend, in the corner of the plot area that hides the fewest line samples (top right,
  // top left, bottom right, bottom left on a tie).
  bool named = false;
  int name_w = 0;
  for (const series& s : data) {
    named = named || !s.name.empty();
    name_w = std::max(name_w, text_width(s.name, ts));
  }
  if (named) {
    const int sample = 22 * ts, row = th + 3 * ts;
    const int bw = pad + sample + pad + name_w + pad, bh = pad + static_cast<int>(data.size()) * row + pad / 2;
    const int corners[4][2] = {{right - pad - bw, top + pad},
                               {left + pad, top + pad},
                               {right - pad - bw, bottom - pad - bh},
                               {left + pad, bottom - pad - bh}};
    int bx = corners[0][0], by = corners[0][1];
    std::size_t best = std::numeric_limits<std::size_t>::max();
    for (const auto& cn : corners) {
      std::size_t hidden = 0;
      for (const auto& p : samples)
        hidden += p[0] >= cn[0] - mr && p[0] <= cn[0] + bw + mr && p[1] >= cn[1] - mr && p[1] <= cn[1] + bh + mr;
      if (hidden < best) best = hidden, bx = cn[0], by = cn[1];
    }
    detail::fill_rect(img, bx, by, bx + bw, by + bh, rgb3{255, 255, 255});
    detail::fill_rect(img, bx, by, bx + bw, by + 1, frame);
    detail::fill_rect(img, bx, by + bh - 1, bx + bw, by + bh, frame);
    detail::fill_rect(img, bx, by, bx + 1, by + bh, frame);
    detail::fill_rect(img, bx + bw - 1, by, bx + bw, by + bh, frame);
    const detail::clip_box all{0, 0, width, height};
    for (std::size_t si = 0; si < data.size(); ++si) {
      const rgb3 c = detail::series_color(si);
      const int y = by + pad + static_cast<int>(si) * row;
      const double ly = y + font5x7::body_h * ts / 2.0;
      detail::draw_segment(img, bx + pad, ly, bx + pad + sample, ly, lw, c, all);
      if (with_markers[si]) detail::draw_disc(img, bx + pad + sample / 2.0, ly, mr, c, all);
      draw_text(img, bx + pad + sample + pad, y, data[si].name, black, ts);
    }
  }

  // Title and axis labels.
  if (!title.empty()) draw_text(img, (left + right - text_width(title, ts + 1)) / 2, pad, title, black, ts + 1);
  if (!x_label.empty()) draw_text(img, (left + right - text_width(x_label, ts)) / 2, height - pad - th, x_label, black, ts);
  if (!y_label.empty())
    draw_text_up(img, pad, (top + bottom - text_width(y_label, ts)) / 2, y_label, black, ts);
  return img;
}

/// Renders the series (plot_image) and writes them as a PNG file, atomically.
inline void plot_png(const std::string& path, const std::string& title, const std::string& x_label,
                     const std::string& y_label, const std::vector<series>& data, int width = 800, int height = 500) {
  write_png(path, plot_image(title, x_label, y_label, data, width, height));
}

}  // namespace dino::io
