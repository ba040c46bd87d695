"""The training loop's step scheduling: on a GPU each step is read back after the next one is queued."""

from raytune_it.train.loop import run_steps


def _schedule(steps, read_late, read_at_once):
    events, count = [], iter(range(steps))

    def queue_step():
        step = next(count)
        events.append(f"queue {step}")
        return step

    run_steps(queue_step, lambda step: events.append(f"read {step}"), steps, read_late=read_late,
              read_at_once=read_at_once)
    return events


def test_late_reads_read_each_step_after_the_next_is_queued_and_eval_steps_at_once():
    events = _schedule(6, read_late=True, read_at_once=lambda index: index == 2)
    assert events == ["queue 0", "queue 1", "read 0", "queue 2", "read 1", "read 2",  # step 2 evaluates
                      "queue 3", "queue 4", "read 3", "queue 5", "read 4", "read 5"]


def test_without_late_reads_every_step_is_read_before_the_next_is_queued():
    events = _schedule(3, read_late=False, read_at_once=lambda index: False)
    assert events == ["queue 0", "read 0", "queue 1", "read 1", "queue 2", "read 2"]


def test_no_steps_reads_nothing():
    assert _schedule(0, read_late=True, read_at_once=lambda index: True) == []
