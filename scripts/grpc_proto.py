"""Prints the service and messages of proto/grpc_service.proto (everything after its licence
header and `package inference;`) from the descriptors compiled into the tritonclient wheel
(tritonclient/grpc/service_pb2.py and model_config_pb2.py): Triton's own names and field
numbers, cut down to the RPCs Nightingale serves and the messages they need. Of
model_config.proto (the ModelConfig RPC's answer) only the fields in MODEL_CONFIG_FIELDS are
printed: proto3 readers skip what a message does not carry, so tritonclient reads the subset.

    python scripts/grpc_proto.py [SITE_PACKAGES/tritonclient/grpc/] > /tmp/body.proto
    diff /tmp/body.proto <(sed -n '/^service /,$p' proto/grpc_service.proto)

Needs tritonclient[grpc] (protobuf) in the running Python.
"""
import importlib.util
import os
import sys

import tritonclient

base = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(tritonclient.__file__), "grpc") + "/"
spec2 = importlib.util.spec_from_file_location("model_config_pb2", base + "model_config_pb2.py")
m2 = importlib.util.module_from_spec(spec2); spec2.loader.exec_module(m2)
sys.modules['tritonclient.grpc.model_config_pb2'] = m2
spec = importlib.util.spec_from_file_location("svc", base + "service_pb2.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
from google.protobuf import descriptor_pb2 as d
fd = d.FileDescriptorProto(); m.DESCRIPTOR.CopyToProto(fd)
RPCS = ["ServerLive","ServerReady","ModelReady","ServerMetadata","ModelMetadata","ModelInfer","ModelConfig","ModelStatistics","RepositoryIndex","RepositoryModelLoad","RepositoryModelUnload"]
msgs = {mt.name: mt for mt in fd.message_type}
# model_config.proto: the messages of the ModelConfig answer, with the fields Nightingale fills.
MODEL_CONFIG_FIELDS = {
    "ModelConfig": ["name", "platform", "backend", "version_policy", "max_batch_size", "input",
                    "output", "dynamic_batching", "instance_group"],
    "ModelVersionPolicy": None,
    "ModelInput": ["name", "data_type", "format", "dims"],
    "ModelOutput": ["name", "data_type", "dims"],
    "ModelDynamicBatching": ["preferred_batch_size", "max_queue_delay_microseconds"],
    "ModelInstanceGroup": ["name", "kind", "count", "gpus"],
}
fd2 = d.FileDescriptorProto(); m2.DESCRIPTOR.CopyToProto(fd2)
for mt in fd2.message_type:
    if mt.name in MODEL_CONFIG_FIELDS:
        keep = MODEL_CONFIG_FIELDS[mt.name]
        if keep is not None:
            kept = [f for f in mt.field if f.name in keep]
            assert len(kept) == len(keep), (mt.name, keep)
            del mt.field[:]
            mt.field.extend(kept)
            used = {f.type_name.split(".")[-1] for f in kept if f.type_name}
            nested = [nt for nt in mt.nested_type if nt.name in used]
            del mt.nested_type[:]
            mt.nested_type.extend(nested)
            enums = [e for e in mt.enum_type if e.name in used]
            del mt.enum_type[:]
            mt.enum_type.extend(enums)
        msgs[mt.name] = mt
config_enums = [e for e in fd2.enum_type if e.name == "DataType"]
T = {v: k[5:].lower() for k, v in d.FieldDescriptorProto.Type.items()}
need = []
def want(name):
    name = name.lstrip(".")
    assert name.startswith("inference."), name
    top = name[len("inference."):].split(".")[0]
    if top in need or top == "DataType": return
    need.append(top)
    visit(msgs[top])
def visit(mt):
    for f in mt.field:
        if f.type_name: 
            n = f.type_name.lstrip(".")
            if n.startswith("inference."):
                top = n[len("inference."):].split(".")[0]
                if top != mt.name and top in msgs: want(n)
    for nt in mt.nested_type: visit(nt)
svc = fd.service[0]
for meth in svc.method:
    if meth.name in RPCS:
        want(meth.input_type); want(meth.output_type)
def tname(f, scope):
    if f.type_name:
        return f.type_name.lstrip(".").replace("inference.", "", 1)
    return T[f.type]
def emit_enum(e, ind, out):
    p = "  " * ind
    out.append(f"{p}enum {e.name} {{")
    for v in e.value:
        out.append(f"{p}  {v.name} = {v.number};")
    out.append(f"{p}}}")
def emit(mt, ind, out):
    p = "  " * ind
    out.append(f"{p}message {mt.name} {{")
    for e in mt.enum_type:
        emit_enum(e, ind + 1, out)
    maps = {nt.name: nt for nt in mt.nested_type if nt.options.map_entry}
    for nt in mt.nested_type:
        if not nt.options.map_entry: emit(nt, ind + 1, out)
    oneofs = {}
    for f in mt.field:
        if f.HasField("oneof_index") and not f.proto3_optional:
            oneofs.setdefault(f.oneof_index, []).append(f)
    done = set()
    for f in mt.field:
        if f.HasField("oneof_index") and not f.proto3_optional:
            i = f.oneof_index
            if i in done: continue
            done.add(i)
            out.append(f"{p}  oneof {mt.oneof_decl[i].name} {{")
            for g in oneofs[i]:
                out.append(f"{p}    {tname(g, mt)} {g.name} = {g.number};")
            out.append(f"{p}  }}")
            continue
        tn = f.type_name.split(".")[-1] if f.type_name else ""
        if tn in maps:
            k, v = maps[tn].field
            out.append(f"{p}  map<{tname(k, mt)}, {tname(v, mt)}> {f.name} = {f.number};")
        else:
            lab = "repeated " if f.label == d.FieldDescriptorProto.LABEL_REPEATED else ("optional " if f.proto3_optional else "")
            out.append(f"{p}  {lab}{tname(f, mt)} {f.name} = {f.number};")
    out.append(f"{p}}}")
out = []
out.append("service GRPCInferenceService {")
for meth in svc.method:
    if meth.name in RPCS:
        out.append(f"  rpc {meth.name}({meth.input_type.split('.')[-1]}) returns ({meth.output_type.split('.')[-1]}) {{}}")
out.append("}")
for n in [mt.name for mt in list(fd.message_type) + list(fd2.message_type) if mt.name in need]:
    out.append("")
    emit(msgs[n], 0, out)
for e in config_enums:
    out.append("")
    emit_enum(e, 0, out)
print("\n".join(out))
