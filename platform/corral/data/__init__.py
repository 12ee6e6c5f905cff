"""Data: pretraining corpora (Ray Data), the dialog and preference formats, SFT encoding, the task suite."""


def quiet_progress_bars(*datasets) -> None:
    """No Ray Data progress bars: in a pipeline step or a training worker nothing reads them live,
    and their redraws fill job logs with cursor codes (1,600 lines for the tiny data step) and
    cost CPU on a small machine. A dataset carries the context it was made under, so the ones
    given are quietened too; steps print their own progress lines instead."""
    from ray.data import DataContext

    for context in [DataContext.get_current()] + [ds.context for ds in datasets]:
        context.enable_progress_bars = False
