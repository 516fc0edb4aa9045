"""Talks to a Warrant agent's SPIFFE Workload API with py-spiffe (a real
SPIFFE client), then makes a raw gRPC call without the security header.
Usage: workload_api_client.py SOCKET_PATH EXPECTED_SPIFFE_ID"""
import subprocess
import sys

import grpc
from spiffe import WorkloadApiClient

# Another process: connects, says ready, and on a line from its standard
# input asks for a new audience set once (argument: the socket).
OTHER_CALLER = """
import sys, grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
grpc.channel_ready_future(channel).result(timeout=10)
stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
print("ready", flush=True)
sys.stdin.readline()
try:
    answer = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["second-process"]), metadata=[("workload.spiffe.io", "true")], timeout=10)
    print("issued" if answer.svids and answer.svids[0].svid else "empty", flush=True)
except grpc.RpcError as error:
    print(error.code(), error.details(), flush=True)
"""

socket_path, expected = sys.argv[1], sys.argv[2]
with WorkloadApiClient(socket_path="unix://" + socket_path, default_timeout=10) as client:
    svid = client.fetch_x509_svid()
    assert str(svid.spiffe_id) == expected, f"x509 svid is {svid.spiffe_id}"
    assert svid.leaf.not_valid_after_utc > svid.leaf.not_valid_before_utc
    bundles = client.fetch_x509_bundles()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None and len(bundle.x509_authorities) >= 1, "no X.509 bundle for the trust domain"
    jwt = client.fetch_jwt_svid(audience={"sts.amazonaws.com"})
    assert str(jwt.spiffe_id) == expected, f"jwt svid is {jwt.spiffe_id}"
    validated = client.validate_jwt_svid(jwt.token, "sts.amazonaws.com")
    assert str(validated.spiffe_id) == expected
    # Asked again and again (past the 100 at once one identity line may be
    # issued), the agent hands out the JWT-SVID it holds until half its
    # lifetime has passed; other audiences get another.
    for _ in range(150):
        again = client.fetch_jwt_svid(audience={"sts.amazonaws.com"})
        assert again.token == jwt.token, "a second JWT-SVID for the same audience within its first half-life"
    other = client.fetch_jwt_svid(audience={"vault"})
    assert other.token != jwt.token and other.audience == {"vault"}, f"audience {other.audience}"
    # The claims ValidateJWTSVID returns are the token's own, with their JWT types.
    from spiffe._proto import workload_pb2, workload_pb2_grpc
    raw = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:" + socket_path))
    answer = raw.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="sts.amazonaws.com", svid=jwt.token),
                                 metadata=[("workload.spiffe.io", "true")], timeout=10)
    claims = dict(answer.claims)
    assert claims["sub"] == expected, claims
    assert isinstance(claims["exp"], float) and isinstance(claims["iat"], float) and claims["exp"] > claims["iat"], claims
    assert claims["aud"] == "sts.amazonaws.com" or list(claims["aud"]) == ["sts.amazonaws.com"], claims
    # New audience sets past the agent's budget (10 a second, 50 at once) are refused for now.
    second = subprocess.Popen([sys.executable, "-c", OTHER_CALLER, socket_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert second.stdout.readline().strip() == "ready"
    exhausted = 0
    for i in range(150):
        try:
            raw.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[f"aud-{i}"]), metadata=[("workload.spiffe.io", "true")], timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            exhausted += 1
    assert exhausted > 0, "150 new audience sets at once were all issued"
    # No process takes more than half the agent's budget: another one (its own pid), asking at once, still gets a new audience set.
    said, _ = second.communicate("go\n", timeout=60)
    assert second.returncode == 0 and said.strip() == "issued", said
    # Validations past the agent's budget (50 a second, 100 at once; each asks the cluster) too, asked all at once.
    # (Eight connections: the agent takes 32 streams on one.)
    stubs = [workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:" + socket_path)) for _ in range(8)]
    calls = [stubs[i % 8].ValidateJWTSVID.future(workload_pb2.ValidateJWTSVIDRequest(audience="sts.amazonaws.com", svid=jwt.token),
                                                 metadata=[("workload.spiffe.io", "true")], timeout=30) for i in range(250)]
    refused = 0
    for call in calls:
        try:
            assert call.result().spiffe_id == expected
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            refused += 1
    assert 0 < refused < 250, f"{refused} of 250 validations at once refused"
    jwt_bundles = client.fetch_jwt_bundles()
    assert jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) is not None, "no JWT bundle"
    try:
        client.validate_jwt_svid(jwt.token, "someone-else")
        print("validated a token for another audience")
        sys.exit(1)
    except Exception:
        pass
print("py-spiffe ok", svid.spiffe_id)

channel = grpc.insecure_channel("unix:" + socket_path)
call = channel.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID", request_serializer=lambda x: x, response_deserializer=lambda x: x)
try:
    call(b"", timeout=10)
    print("a call without the workload.spiffe.io header was answered")
    sys.exit(1)
except grpc.RpcError as error:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.code()
print("no header: INVALID_ARGUMENT")
