// Batch-normalization math shared by the CPU and CUDA kernels: merging
// per-chunk statistics (Chan et al.), the per-channel coefficients of the
// forward normalization and of the input gradient, and the per-element
// formulas that use them. Kernel files only decide how to loop and in which
// fixed order to combine partials.
//
// Per-channel quantities are computed in double whatever the data type.
// The channel mean is handed to the elementwise formulas as a pair
// (hi, lo) of the data type with hi + lo ~= mean: for float32 data whose
// mean is 1e4 times its spread, x - hi is exact (Sterbenz) and the rounding
// of the mean alone would otherwise shift every normalized value by up to
// 5e-4.
#pragma once

#include "fusednn/config.h"

namespace fusednn {

// Statistics of one chunk of a channel: count, mean and the sum of squared
// deviations from the mean (M2).
struct Moments {
  double count;
  double mean;
  double m2;
};

// Moments from sums taken around a shift close to the data (a sample of the
// chunk): s1 = sum(x - shift), s2 = sum((x - shift)^2), both accumulated in
// double. The shift keeps s2 - s1^2 / n from cancelling.
FUSEDNN_HD Moments moments_from_shifted_sums(double count, double shift, double s1, double s2) {
  const double offset = s1 / count;
  const double m2 = s2 - s1 * offset;
  return {count, shift + offset, m2 < 0.0 ? 0.0 : m2};  // keeps NaN
}

// The center of a chunk's sums: the median of three of its samples, so that
// no single outlier can be the center. Ordered comparisons as std::min and
// std::max make them (a NaN sample may or may not be picked).
FUSEDNN_HD double median_of_three(double a, double b, double c) {
  const double low = b < a ? b : a;
  const double high = a < b ? b : a;
  const double middle = c < high ? c : high;
  return low < middle ? middle : low;
}

// Per-element accumulation of the forward statistics: sums of d = x - center
// and d^2 in double, center a sample of the chunk. In double, s2 - s1^2 / n
// loses about (center - mean)^2 / var times 1e-16 relative to the variance.
struct StatisticsSums {
  static constexpr bool kReadsGradient = false;
  template <class T> FUSEDNN_HD static void add(double& s1, double& s2, T x, T, double center) {
    add_widened(s1, s2, static_cast<double>(x), 0.0, center);
  }
  // add() on values already in double, D: double, or a CPU vector of
  // doubles whose lanes are independent sums.
  template <class D> FUSEDNN_HD static void add_widened(D& s1, D& s2, D x, D, D center) {
    const D d = x - center;
    s1 += d;
    s2 += d * d;
  }
  // The same sums in the data type over a few rows, which then join the
  // double sums: the channels-last loops vectorize these twice as wide and
  // without conversions. center = center_hi + center_lo; over a few rows
  // the data-type rounding stays near 2^-24 of the partial.
  template <class T>
  FUSEDNN_HD static void add_partial(T& s1, T& s2, T x, T, T center_hi, T center_lo) {
    const T d = (x - center_hi) - center_lo;
    s1 += d;
    s2 = fmadd(d, d, s2);
  }
};

// Per-element accumulation of the backward sums: sum(dy) and
// sum(dy * (x - mean)), center the saved mean.
struct GradientSums {
  static constexpr bool kReadsGradient = true;
  template <class T> FUSEDNN_HD static void add(double& s1, double& s2, T x, T dy, double center) {
    add_widened(s1, s2, static_cast<double>(x), static_cast<double>(dy), center);
  }
  // See StatisticsSums::add_widened.
  template <class D> FUSEDNN_HD static void add_widened(D& s1, D& s2, D x, D dy, D center) {
    s1 += dy;
    s2 += dy * (x - center);
  }
  // See StatisticsSums::add_partial.
  template <class T>
  FUSEDNN_HD static void add_partial(T& s1, T& s2, T x, T dy, T center_hi, T center_lo) {
    s1 += dy;
    s2 = fmadd(dy, (x - center_hi) - center_lo, s2);
  }
};

// A ReLU fused after the normalization: the forward writes relu(bn(x)) in
// the same pass, and the backward masks dy by the forward's output y inside
// the batch-norm backward's own passes (the sums and the input gradient),
// so that the pair reads and writes memory once. Both are fusednn's relu
// (activations.h, act::Relu): -0 and NaN pass forward, and the gradient is
// kept where y > 0 or y is NaN. T{} is zero for scalars and for the CPU's
// vector lines alike.
template <class T> FUSEDNN_HD T relu_after_normalize(T y) { return y < T{} ? T{} : y; }

// The loops' policies for the gradient they read: as given, or masked by
// the fused ReLU's output. kReadsOutput says whether y is read at all.
struct GradientAsGiven {
  static constexpr bool kReadsOutput = false;
  template <class T> FUSEDNN_HD static T gradient(T dy, T) { return dy; }
};
struct GradientThroughRelu {
  static constexpr bool kReadsOutput = true;
  template <class T> FUSEDNN_HD static T gradient(T dy, T y) { return y <= T{} ? T{} : dy; }
};

// Chan's pairwise merge; the result depends on the order of merging, so
// callers merge partials in a fixed order to get the same bits every run.
FUSEDNN_HD Moments merge_moments(const Moments& a, const Moments& b) {
  const double count = a.count + b.count;
  const double delta = b.mean - a.mean;
  const double weight_b = b.count / count;
  const double mean = a.mean + delta * weight_b;
  const double m2 = a.m2 + b.m2 + delta * delta * a.count * weight_b;
  // An empty side leaves the other as it is. Selects rather than early
  // returns, so that merges across a vector of channels vectorize.
  const bool keep_a = b.count == 0.0;
  const bool keep_b = !keep_a && a.count == 0.0;
  return {keep_a ? a.count : keep_b ? b.count : count,
          keep_a ? a.mean : keep_b ? b.mean : mean,
          keep_a ? a.m2 : keep_b ? b.m2 : m2};
}

// The statistics of rows[0..ranks) merged in row order: rank r holds
// counts[r] elements per channel with mean means[r] and M2 m2s[r] (a
// process's batch_norm_stats; a rank with no elements is skipped). The same
// inputs give the same bits.
template <class Row>
FUSEDNN_HD Moments merge_ranks(int64_t ranks, const double* counts, const Row& row) {
  Moments acc{0.0, 0.0, 0.0};
  for (int64_t r = 0; r < ranks; ++r) acc = merge_moments(acc, row(r, counts[r]));
  return acc;
}

FUSEDNN_HD double inverse_std(double variance, double eps) { return 1.0 / sqrt(variance + eps); }

// The unbiased variance of `count` elements whose biased variance is
// `variance`, for the running statistics.
FUSEDNN_HD double unbiased_variance(double variance, double count) {
  return variance * count / (count - 1.0);
}

// running <- (1 - momentum) * running + momentum * batch.
FUSEDNN_HD double running_update(double running, double batch, double momentum) {
  return (1.0 - momentum) * running + momentum * batch;
}

// y = (x - mean) * invstd * gamma + beta, with the mean split into hi + lo.
template <class T> struct NormalizeCoefficients {
  T mean_hi;
  T mean_lo;
  T scale;  // gamma * invstd
  T shift;  // beta
};

template <class T>
FUSEDNN_HD NormalizeCoefficients<T> normalize_coefficients(double mean, double invstd, double gamma,
                                                          double beta) {
  const T hi = static_cast<T>(mean);
  return {hi, static_cast<T>(mean - static_cast<double>(hi)), static_cast<T>(gamma * invstd),
          static_cast<T>(beta)};
}

template <class T>
FUSEDNN_HD T normalize(T x, T mean_hi, T mean_lo, T scale, T shift) {
  return ((x - mean_hi) - mean_lo) * scale + shift;
}

// Whether x - mean can overflow T for some finite x of type T, which
// normalize() would turn into an infinity: for float only where |mean| is
// at least 2^102 (the largest float plus 2^102 is still below the rounding
// boundary to infinity, 2^128 - 2^103). Such channels are normalized with
// normalize_wide. double data never overflows this way from float-sized
// statistics and is left as it is.
template <class T> FUSEDNN_HD bool shift_may_overflow(double mean) {
  if (sizeof(T) == sizeof(double)) return false;
  return (mean < 0.0 ? -mean : mean) >= 0x1p102;
}

// normalize() in double, where x - mean would overflow: the CPU loops take it
// for channels where shift_may_overflow, the GPU for elements whose float
// result came out infinite from a finite x.
template <class T>
FUSEDNN_HD T normalize_wide(T x, double mean, double scale, double shift) {
  return static_cast<T>((static_cast<double>(x) - mean) * scale + shift);
}

// With m elements per channel, xhat = (x - mean) * invstd,
//   dx = gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat))
//      = a * dy - e - k * xhat
// where a = gamma * invstd, e = a * sum(dy) / m and
// k = a * sum(dy * xhat) / m. k multiplies xhat, not
// x - mean: the coefficient of x - mean, a * invstd^2 * ..., underflows
// float32 for channels whose spread is above about 1e13, while k and xhat
// stay near the size of a * dy for every finite input.
template <class T> struct InputGradCoefficients {
  T mean_hi;
  T mean_lo;
  T invstd;
  T a;
  T e;
  T k;
};

// sum_dy_xhat = invstd * sum(dy * (x - mean)), also grad_gamma. count is the
// elements per channel of the whole batch: in data-parallel training, the
// sum over every process, as are sum_dy and sum_dy_xhat.
template <class T>
FUSEDNN_HD InputGradCoefficients<T> input_grad_coefficients(double count, double mean, double invstd,
                                                            double gamma, double sum_dy,
                                                            double sum_dy_xhat) {
  const T hi = static_cast<T>(mean);
  const double a = gamma * invstd;
  return {hi, static_cast<T>(mean - static_cast<double>(hi)), static_cast<T>(invstd),
          static_cast<T>(a), static_cast<T>(a * sum_dy / count),
          static_cast<T>(a * sum_dy_xhat / count)};
}

template <class T>
FUSEDNN_HD T input_grad(T dy, T x, T mean_hi, T mean_lo, T invstd, T a, T e, T k) {
  return (a * dy - e) - k * (((x - mean_hi) - mean_lo) * invstd);
}

// The input gradient of inference-mode batch norm, whose statistics are
// constants: dx = gamma * invstd * dy. As normalize() coefficients applied
// to dy, so that the loops of the forward pass serve; it does not read x,
// so an infinite x cannot turn it into NaN.
template <class T>
FUSEDNN_HD NormalizeCoefficients<T> inference_input_grad_coefficients(double invstd, double gamma) {
  return {T(0), T(0), static_cast<T>(gamma * invstd), T(0)};
}

}  // namespace fusednn
