"""The two kinds of event instruments the proxy updates while it runs: labelled counters and
fixed-bucket histograms.

They are deliberately plain (a dict of ints, a list of bucket counts) rather than
prometheus_client's own Counter and Histogram: everything runs in the reactor thread, so no lock
is needed, and a histogram observation on the request path is one `bisect` and two additions.
prometheus_client still produces the exposition: the collector (collector.py) turns these into
its metric families at scrape time.  Label values are given positionally, in the order of the
instrument's `labels`.
"""

import bisect
import collections


class Counter:
    """Counts events per label values: `inc(*label_values)`."""

    __slots__ = ("name", "help", "labels", "values")

    def __init__(self, name, help_text, labels):
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self.values = collections.defaultdict(int)

    def inc(self, *label_values, amount=1):
        self.values[label_values] += amount

    def value(self, *label_values):
        return self.values.get(label_values, 0)

    def forget(self, first_label_value):
        """Drop every series whose first label (the proxy name) is *first_label_value*."""
        for key in [k for k in self.values if k and k[0] == first_label_value]:
            del self.values[key]


class HistogramSeries:
    """One labelled series of a Histogram: counts per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value):
        """Record *value* (seconds).  bisect_left: a value equal to a bound goes in that bucket
        (Prometheus buckets are "less than or equal").  Done inline for a 0 s borrow
        (BackendPool.try_borrow: the first bucket): change them together."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_pair(self, other, value):
        """Record *value* here and in *other*, a series with the same bounds: one bisect for
        both (a request's response and database latencies are the same value when it went to
        the database on arrival)."""
        i = bisect.bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        other.counts[i] += 1
        other.sum += value

    @property
    def count(self):
        return sum(self.counts)

    def cumulative(self):
        """-> [(le, cumulative count)] with le as Prometheus writes it ("0.005", "+Inf")."""
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((_le(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


def _le(bound):
    return repr(float(bound))


class Histogram:
    """Observations in seconds, per label values: `observe(*label_values, seconds)`, or
    `series(*label_values).observe(seconds)` to keep the series and skip the lookup."""

    __slots__ = ("name", "help", "labels", "bounds", "_series")

    def __init__(self, name, help_text, labels, buckets):
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._series = {}

    def series(self, *label_values):
        found = self._series.get(label_values)
        if found is None:
            found = self._series[label_values] = HistogramSeries(self.bounds)
        return found

    def observe(self, *args):
        key = args[:-1]
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = HistogramSeries(self.bounds)
        found.observe(args[-1])

    def items(self):
        return list(self._series.items())

    def forget(self, first_label_value):
        for key in [k for k in self._series if k and k[0] == first_label_value]:
            del self._series[key]


# Buckets (seconds).  Borrow latency is 0 for an idle connection and up to ConnectionBorrowTimeout
# (default 120 s) when the pool is exhausted; query latencies span sub-millisecond point queries
# to long reports.
BORROW_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0)
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0)
