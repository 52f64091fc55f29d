"""Collective byte counting on literal HLO text (ring formulas, async pairs, loops)."""
import pytest

from parallel import _hlo

MODULE = """\
HloModule jit_step, entry_computation_layout={(f32[512,256]{1,0})->f32[512,256]{1,0}}, num_partitions=8

%add.clone (x.1: f32[], y.1: f32[]) -> f32[] {
  %x.1 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x.1, %y.1)
}

%body (p: (s32[], f32[16,32])) -> (s32[], f32[64,32]) {
  %p = (s32[], f32[16,32]{1,0}) parameter(0)
  %gte = f32[16,32]{1,0} get-tuple-element(%p), index=1
  %ag = f32[64,32]{1,0} all-gather(%gte), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[64,32]{1,0}) tuple(%i, %ag)
}

%cond (p.1: (s32[], f32[16,32])) -> pred[] {
  %p.1 = (s32[], f32[16,32]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[512,256], b: f32[256]) -> f32[512,256] {
  %a = f32[512,256]{1,0} parameter(0)
  %b = f32[256]{0} parameter(1)
  %all-reduce = (f32[512,256]{1,0}, /*index=1*/f32[256]{0}) all-reduce(%a, %b), channel_id=1, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, use_global_device_ids=true, to_apply=%add.clone
  %reduce-scatter = f32[16,256]{1,0} reduce-scatter(%x), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add.clone
  %all-to-all = (f32[4,1,32]{2,1,0}, f32[4,1,32]{2,1,0}) all-to-all(%p2, %q2), channel_id=4, replica_groups={{0,1},{2,3},{4,5},{6,7}}
  %cp-start = (bf16[128]{0}, bf16[128]{0}, u32[], u32[]) collective-permute-start(%c), channel_id=5, source_target_pairs={{0,1},{1,2}}
  %cp-done = bf16[128]{0} collective-permute-done(%cp-start)
  %ag-start = (f32[8,32]{1,0}, f32[64,32]{1,0}) all-gather-start(%g), channel_id=6, replica_groups={}, dimensions={0}
  %ag-done = f32[64,32]{1,0} all-gather-done(%ag-start)
  %fusion = f32[64,32]{1,0} fusion(%ag-done), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/all-gather"}
  %while = (s32[], f32[64,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[512,256]{1,0} get-tuple-element(%all-reduce), index=0
}
"""


def test_each_collective_kind_uses_its_ring_formula():
    counts = _hlo.collective_bytes(MODULE, num_devices=8)
    # all-reduce of a (512x256 + 256) f32 tuple over the 8 devices of mesh axis_0:
    # S = 524288 + 1024 = 525312, sent = 2 * 7/8 * S = 919296
    assert counts["all-reduce"] == {"count": 1, "payload_bytes": 525312, "sent_bytes": 919296}
    # reduce-scatter to f32[16,256] in groups of 4: operand 4 * 16384 = 65536, sent 3/4 of it
    assert counts["reduce-scatter"] == {"count": 1, "payload_bytes": 65536, "sent_bytes": 49152}
    # all-to-all of two f32[4,1,32] (1024 bytes) in pairs: sent 1/2
    assert counts["all-to-all"] == {"count": 1, "payload_bytes": 1024, "sent_bytes": 512}
    # async permute counted once at its start with the bf16[128] buffer
    assert counts["collective-permute"] == {"count": 1, "payload_bytes": 256, "sent_bytes": 256}
    # all-gather-start to f32[64,32] over all 8 devices ({} groups): 7/8 * 8192 = 7168;
    # plus the loop body's gather over groups of 4, 3/4 * 8192 = 6144, three iterations
    assert counts["all-gather"] == {"count": 4, "payload_bytes": 4 * 8192,
                                    "sent_bytes": 7168 + 3 * 6144}


@pytest.mark.parametrize("attributes, expected", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 4),
    ("replica_groups=[4,2]<=[8], dimensions={0}", 2),
    ("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}", 4),
    ("replica_groups=mesh['data'=2,'model'=4] {'model'}, dimensions={0}", 4),
    ("replica_groups=mesh['data'=2,'model'=4] {'data','model'}, dimensions={0}", 8),
    ("replica_groups={}, dimensions={0}", 8),
    ("dimensions={0}", 8),
])
def test_group_size_formats(attributes, expected):
    assert _hlo.group_size(attributes, num_devices=8) == expected


def test_array_bytes_of_tuple_shapes():
    assert _hlo.array_bytes("(f32[8,4]{1,0}, /*index=1*/bf16[2], pred[], s4[6])") == [128, 4, 1, 3]


def test_non_collective_lines_are_ignored():
    line = ('  %get-tuple-element.1 = f32[256,512]{1,0} get-tuple-element(%all-reduce.3), index=1, '
            'metadata={op_name="jit(step)/transpose(jvp())/dot_general"}')
    assert _hlo.parse_collective(line, 8) is None
    assert _hlo.parse_collective("  %d = f32[64]{0} all-gather-done(%s)", 8) is None
