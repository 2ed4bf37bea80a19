"""The event model and its codec: the Python mirror of bpf/hairtrace.h.

Below tracer.kernel (which produces records), tracer.session (which stores them)
and tracer.analysis (which interprets them); all of them import it, it imports
none of them. model: Event, Tuple, Conntrack, points; codec: struct ht_event <->
Event (decode, encode); rows: records as numpy rows and the columns the
streaming analysis reads.
"""
