"""Pipeline parallelism: stages on sub-meshes, GPipe and 1F1B schedules, automatic stages."""
from parallel.pipeline._marker import mark_pipeline_boundary as mark_pipeline_boundary
from parallel.pipeline._method import PipeshardParallel as PipeshardParallel
from parallel.pipeline._schedule import bubble_fraction as bubble_fraction
from parallel.pipeline._schedule import max_in_flight as max_in_flight
