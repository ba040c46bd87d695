"""OpenAI's fine-tuning API on the Serve app (``serve.fine_tuning=true``): a second door into the same path.

A client uploads a file (``files``), creates a job (``jobs``): the request becomes the app's own JobConfig
with the file and the hyperparameters (``requests``), saved beside the job and run as a Ray Job of
``raytune-it train`` (``runner``), which outlives any replica and resumes from its checkpoint. Job state is
a JSON document per job in ``run.storage/fine_tuning/`` (``store``), reconciled with Ray's job status; the
run's own files give the events and checkpoints (``events``). A succeeded job's adapter is then served by
the same app as ``ft:<base>:<organization>:<suffix>:<job id>`` (``names``). Every object belongs to one
organization (``organizations``), and another organization's is answered as if it did not exist.
"""
