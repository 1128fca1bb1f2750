"""What StepStops' stop vote costs per poll under torchrun (`distributed.StopVote`: an async gloo all-reduce of one
flag, waited at the next poll), against a poll without it. Run with
`torchrun --standalone --nproc_per_node 2 .ci/stop-vote-cost.py [POLLS] [STEP_MS]`: each rank polls POLLS times, with
STEP_MS of sleep between polls standing in for a training step; rank 0 prints microseconds per poll."""
import sys
import time

from world_model import distributed

polls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
step_s = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
distributed.setup("cpu")
vote = distributed.StopVote()
for label, call in (("no vote", lambda: 0), ("vote", lambda: vote(0))):
    distributed.barrier()
    spent = 0.0
    for _ in range(polls):
        time.sleep(step_s)
        t = time.perf_counter()
        call()
        spent += time.perf_counter() - t
    if distributed.is_main():
        print(f"{label}: {1e6 * spent / polls:.1f} us per poll ({polls} polls, {1000 * step_s:.1f} ms steps)")
vote.settle()
distributed.barrier()
distributed.shutdown()
