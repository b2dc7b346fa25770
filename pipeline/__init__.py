"""winnow's framework: sources, embedding store, index, manifest, selection, training-loop adapters.

Nothing here imports Prefect; flows/ wraps these functions in tasks.
"""
