"""scripts/bench: hairtrace's performance measured against baselines in one run.

rows, table -- Row and Target (value, baseline, spread over rounds, target, met or n/a);
               the text table
runner      -- every section in turn; a failed section becomes n/a rows; cleanup on signals
load        -- the machine's load while a section runs (load average, others' CPU)
context     -- what the sections share (mode, processes, helpers, traffic, a stop request)
procs       -- child processes (tracked, always ended), CPU pinning, the C helpers
netlab      -- the hb-* network namespaces (bridge, veths, a ClusterIP DNAT rule)
traffic     -- UDP and TCP floods through the lab, in packets/s (flood.c)
compare     -- packets/s without and with an observer, interleaved rounds
tracerun    -- hairtrace as a child process: start, wait attached, SIGTERM, report
pipeline    -- synthetic BPF producer (bpf/bench.bpf.c, producer.py) vs hairtrace's drain
pktrate     -- packets/s with and without hairtrace attached
startup     -- process start to attached, SIGTERM to exit
offline     -- `hairtrace replay` of a large synthetic session: events/s, peak RSS (peakrss.c)
peers       -- bpftrace and tcpdump on the same workload (tracefs mounted if missing)

Nothing here asserts a speed: rows say met / NOT met against their targets.
"""
