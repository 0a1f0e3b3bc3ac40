"""AWS classifier: requests serialized and SigV4-signed by botocore itself (see conftest).

The expectations are what AWS (and IAM) would call the request: the signing name as service,
the botocore operation name, and the resources a policy would match on.
"""

from __future__ import annotations

import pytest
from botocore.config import Config

from chaperone_sidecar.policy.classify import aws_models, classify
from chaperone_sidecar.policy.classify.aws import parse_host, parse_scope
from chaperone_sidecar.policy.model import HTTPRequest

LOCAL_S3 = "http://127.0.0.1:5000"
ROLE_ARN = "arn:aws:iam::123456789012:role/deployer"
FN_ARN = "arn:aws:lambda:us-east-1:123456789012:function:fn"
RRSET = {"Changes": [{"Action": "UPSERT", "ResourceRecordSet": {
    "Name": "a.example.com", "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": "192.0.2.1"}]}}]}

# id, (service, method, params, client kwargs), (signing service, region, operation, protocol,
# resources)
SIGNED = [
    # --- query protocol
    ("iam-create-role", ("iam", "create_role", {"RoleName": "r1", "AssumeRolePolicyDocument": "{}"}, {}),
     ("iam", "us-east-1", "CreateRole", "query", ("r1",))),
    ("iam-attach-role-policy", ("iam", "attach_role_policy",
                                {"RoleName": "r1", "PolicyArn": "arn:aws:iam::aws:policy/AdministratorAccess"}, {}),
     ("iam", "us-east-1", "AttachRolePolicy", "query",
      ("r1", "arn:aws:iam::aws:policy/AdministratorAccess"))),
    ("iam-delete-user", ("iam", "delete_user", {"UserName": "bob"}, {}),
     ("iam", "us-east-1", "DeleteUser", "query", ("bob",))),
    ("sts-get-caller-identity", ("sts", "get_caller_identity", {}, {}),
     ("sts", "us-east-1", "GetCallerIdentity", "query", ())),
    ("sts-assume-role", ("sts", "assume_role", {"RoleArn": ROLE_ARN, "RoleSessionName": "agent"},
                         {"region": "eu-west-1"}),
     ("sts", "eu-west-1", "AssumeRole", "query", (ROLE_ARN, "agent"))),
    ("rds-delete-db-instance", ("rds", "delete_db_instance", {"DBInstanceIdentifier": "db1"}, {}),
     ("rds", "us-east-1", "DeleteDBInstance", "query", ("db1",))),
    ("ses-send-email", ("ses", "send_email", {
        "Source": "a@example.com", "Destination": {"ToAddresses": ["b@example.com"]},
        "Message": {"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "b"}}}}, {}),
     ("ses", "us-east-1", "SendEmail", "query", ())),
    # --- ec2 protocol
    ("ec2-describe-instances", ("ec2", "describe_instances", {"InstanceIds": ["i-1", "i-2"]},
                                {"region": "eu-west-1"}),
     ("ec2", "eu-west-1", "DescribeInstances", "ec2", ("i-1", "i-2"))),
    ("ec2-terminate-instances", ("ec2", "terminate_instances", {"InstanceIds": ["i-9"]}, {}),
     ("ec2", "us-east-1", "TerminateInstances", "ec2", ("i-9",))),
    # --- json protocol (X-Amz-Target)
    ("secretsmanager-get-secret-value", ("secretsmanager", "get_secret_value", {"SecretId": "prod/db"}, {}),
     ("secretsmanager", "us-east-1", "GetSecretValue", "json", ("prod/db",))),
    ("dynamodb-put-item", ("dynamodb", "put_item", {"TableName": "t", "Item": {"a": {"S": "b"}}}, {}),
     ("dynamodb", "us-east-1", "PutItem", "json", ("t",))),
    ("kms-decrypt", ("kms", "decrypt", {"CiphertextBlob": b"x", "KeyId": "alias/k"}, {}),
     ("kms", "us-east-1", "Decrypt", "json", ("alias/k",))),
    ("kms-create-key", ("kms", "create_key", {}, {}),
     ("kms", "us-east-1", "CreateKey", "json", ())),
    ("sqs-send-message", ("sqs", "send_message",
                          {"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/q", "MessageBody": "m"}, {}),
     ("sqs", "us-east-1", "SendMessage", "json", ("https://sqs.us-east-1.amazonaws.com/1/q",))),
    ("dynamodbstreams-list-streams", ("dynamodbstreams", "list_streams", {}, {}),
     ("dynamodb", "us-east-1", "ListStreams", "json", ())),
    ("ecr-describe-repositories", ("ecr", "describe_repositories", {"repositoryNames": ["repo"]}, {}),
     ("ecr", "us-east-1", "DescribeRepositories", "json", ("repo",))),
    ("sagemaker-delete-endpoint", ("sagemaker", "delete_endpoint", {"EndpointName": "e"}, {}),
     ("sagemaker", "us-east-1", "DeleteEndpoint", "json", ("e",))),
    ("cloudwatch-put-metric-data", ("cloudwatch", "put_metric_data",
                                    {"Namespace": "n", "MetricData": [{"MetricName": "m", "Value": 1.0}]}, {}),
     ("monitoring", "us-east-1", "PutMetricData", "json", ())),
    ("stepfunctions-start-execution", ("stepfunctions", "start_execution",
                                       {"stateMachineArn": "arn:aws:states:us-east-1:1:stateMachine:x"}, {}),
     ("states", "us-east-1", "StartExecution", "json", ("arn:aws:states:us-east-1:1:stateMachine:x",))),
    # --- rest-xml
    ("s3-list-buckets", ("s3", "list_buckets", {}, {}),
     ("s3", "us-east-1", "ListBuckets", "rest-xml", ())),
    ("s3-delete-bucket", ("s3", "delete_bucket", {"Bucket": "my-bucket"}, {}),
     ("s3", "us-east-1", "DeleteBucket", "rest-xml", ("my-bucket",))),
    ("s3-create-bucket", ("s3", "create_bucket", {"Bucket": "my-bucket"}, {}),
     ("s3", "us-east-1", "CreateBucket", "rest-xml", ("my-bucket",))),
    ("s3-put-object", ("s3", "put_object", {"Bucket": "my-bucket", "Key": "dir/a b.txt", "Body": b"x"}, {}),
     ("s3", "us-east-1", "PutObject", "rest-xml", ("my-bucket", "my-bucket/dir/a b.txt"))),
    ("s3-get-object-regional", ("s3", "get_object", {"Bucket": "my-bucket", "Key": "a/b/"},
                                {"region": "eu-central-1"}),
     ("s3", "eu-central-1", "GetObject", "rest-xml", ("my-bucket", "my-bucket/a/b/"))),
    ("s3-head-object", ("s3", "head_object", {"Bucket": "my-bucket", "Key": "k"}, {}),
     ("s3", "us-east-1", "HeadObject", "rest-xml", ("my-bucket", "my-bucket/k"))),
    ("s3-put-bucket-tagging", ("s3", "put_bucket_tagging", {"Bucket": "my-bucket", "Tagging": {"TagSet": []}}, {}),
     ("s3", "us-east-1", "PutBucketTagging", "rest-xml", ("my-bucket",))),
    ("s3-create-multipart-upload", ("s3", "create_multipart_upload", {"Bucket": "my-bucket", "Key": "k"}, {}),
     ("s3", "us-east-1", "CreateMultipartUpload", "rest-xml", ("my-bucket", "my-bucket/k"))),
    ("s3-upload-part", ("s3", "upload_part", {"Bucket": "my-bucket", "Key": "k", "PartNumber": 1,
                                              "UploadId": "u", "Body": b"x"}, {}),
     ("s3", "us-east-1", "UploadPart", "rest-xml", ("my-bucket", "my-bucket/k"))),
    ("s3-upload-part-copy", ("s3", "upload_part_copy", {"Bucket": "my-bucket", "Key": "k", "PartNumber": 1,
                                                        "UploadId": "u", "CopySource": {"Bucket": "src", "Key": "o"}}, {}),
     ("s3", "us-east-1", "UploadPartCopy", "rest-xml", ("my-bucket", "my-bucket/k", "src/o"))),
    ("s3-copy-object", ("s3", "copy_object", {"Bucket": "my-bucket", "Key": "k", "CopySource": "src/x y"}, {}),
     ("s3", "us-east-1", "CopyObject", "rest-xml", ("my-bucket", "my-bucket/k", "src/x y"))),
    ("s3-list-parts", ("s3", "list_parts", {"Bucket": "my-bucket", "Key": "k", "UploadId": "u"}, {}),
     ("s3", "us-east-1", "ListParts", "rest-xml", ("my-bucket", "my-bucket/k"))),
    ("s3-abort-multipart", ("s3", "abort_multipart_upload", {"Bucket": "my-bucket", "Key": "k", "UploadId": "u"}, {}),
     ("s3", "us-east-1", "AbortMultipartUpload", "rest-xml", ("my-bucket", "my-bucket/k"))),
    ("s3-delete-objects", ("s3", "delete_objects", {"Bucket": "my-bucket", "Delete": {
        "Objects": [{"Key": "a"}, {"Key": "b&c<d>"}]}}, {}),
     ("s3", "us-east-1", "DeleteObjects", "rest-xml", ("my-bucket", "my-bucket/a", "my-bucket/b&c<d>"))),
    ("s3-list-objects-v2", ("s3", "list_objects_v2", {"Bucket": "my-bucket"}, {}),
     ("s3", "us-east-1", "ListObjectsV2", "rest-xml", ("my-bucket",))),
    ("s3-list-objects", ("s3", "list_objects", {"Bucket": "my-bucket"}, {}),
     ("s3", "us-east-1", "ListObjects", "rest-xml", ("my-bucket",))),
    ("s3-lifecycle-not-deprecated", ("s3", "get_bucket_lifecycle_configuration", {"Bucket": "my-bucket"}, {}),
     ("s3", "us-east-1", "GetBucketLifecycleConfiguration", "rest-xml", ("my-bucket",))),
    ("s3-list-analytics", ("s3", "list_bucket_analytics_configurations", {"Bucket": "my-bucket"}, {}),
     ("s3", "us-east-1", "ListBucketAnalyticsConfigurations", "rest-xml", ("my-bucket",))),
    ("s3-get-analytics", ("s3", "get_bucket_analytics_configuration", {"Bucket": "my-bucket", "Id": "x"}, {}),
     ("s3", "us-east-1", "GetBucketAnalyticsConfiguration", "rest-xml", ("my-bucket",))),
    ("s3-path-style-local", ("s3", "get_object", {"Bucket": "my-bucket", "Key": "k"}, {"endpoint_url": LOCAL_S3}),
     ("s3", "us-east-1", "GetObject", "rest-xml", ("my-bucket", "my-bucket/k"))),
    ("s3-path-style-local-delete", ("s3", "delete_object", {"Bucket": "my-bucket", "Key": "d/x.txt"},
                                    {"endpoint_url": LOCAL_S3}),
     ("s3", "us-east-1", "DeleteObject", "rest-xml", ("my-bucket", "my-bucket/d/x.txt"))),
    ("s3-path-style-local-list-buckets", ("s3", "list_buckets", {}, {"endpoint_url": LOCAL_S3}),
     ("s3", "us-east-1", "ListBuckets", "rest-xml", ())),
    ("s3-path-style-aws", ("s3", "put_object", {"Bucket": "my-bucket", "Key": "k", "Body": b""},
                           {"config": Config(s3={"addressing_style": "path"})}),
     ("s3", "us-east-1", "PutObject", "rest-xml", ("my-bucket", "my-bucket/k"))),
    ("s3control-list-jobs", ("s3control", "list_jobs", {"AccountId": "123456789012"}, {}),
     ("s3", "us-east-1", "ListJobs", "rest-xml", ("123456789012",))),
    ("route53-change-rrsets", ("route53", "change_resource_record_sets",
                               {"HostedZoneId": "Z1", "ChangeBatch": RRSET}, {}),
     ("route53", "us-east-1", "ChangeResourceRecordSets", "rest-xml", ("Z1",))),
    # --- rest-json
    ("lambda-invoke", ("lambda", "invoke", {"FunctionName": "fn"}, {}),
     ("lambda", "us-east-1", "Invoke", "rest-json", ("fn",))),
    ("lambda-get-function", ("lambda", "get_function", {"FunctionName": "fn"}, {"region": "ap-southeast-2"}),
     ("lambda", "ap-southeast-2", "GetFunction", "rest-json", ("fn",))),
    ("lambda-delete-function-arn", ("lambda", "delete_function", {"FunctionName": FN_ARN}, {}),
     ("lambda", "us-east-1", "DeleteFunction", "rest-json", (FN_ARN,))),
    ("apigateway-delete-rest-api", ("apigateway", "delete_rest_api", {"restApiId": "abc"}, {}),
     ("apigateway", "us-east-1", "DeleteRestApi", "rest-json", ("abc",))),
    ("lambda-create-function-body", ("lambda", "create_function", {
        "FunctionName": "f", "Role": ROLE_ARN, "Code": {"ZipFile": b"x"}}, {}),
     ("lambda", "us-east-1", "CreateFunction", "rest-json", ("f",))),
    ("sagemaker-runtime-invoke-endpoint", ("sagemaker-runtime", "invoke_endpoint",
                                           {"EndpointName": "e", "Body": b"x"}, {}),
     ("sagemaker", "us-east-1", "InvokeEndpoint", "rest-json", ("e",))),
    ("eks-describe-cluster", ("eks", "describe_cluster", {"name": "c1"}, {}),
     ("eks", "us-east-1", "DescribeCluster", "rest-json", ("c1",))),
    ("sesv2-send-email", ("sesv2", "send_email", {
        "FromEmailAddress": "a@example.com", "Destination": {"ToAddresses": ["b@example.com"]},
        "Content": {"Simple": {"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "b"}}}}}, {}),
     ("ses", "us-east-1", "SendEmail", "rest-json", ())),
    ("bedrock-runtime-invoke-model", ("bedrock-runtime", "invoke_model", {"modelId": "anthropic.claude", "body": b"{}"}, {}),
     ("bedrock", "us-east-1", "InvokeModel", "rest-json", ("anthropic.claude",))),
]


@pytest.mark.parametrize("call, expected", [pytest.param(c, e, id=i) for i, c, e in SIGNED])
def test_botocore_signed_requests(aws_request, call, expected):
    service, method, params, client_kwargs = call
    request = aws_request(service, method, **client_kwargs, **params)
    action = classify(request, "aws")
    signing, region, operation, protocol, resources = expected
    assert action.errors == ()
    assert action.aws is not None
    assert (action.aws.service, action.aws.region, action.aws.operation) == (signing, region, operation)
    assert action.aws.protocol == protocol
    assert action.aws.resources == resources
    assert action.aws.presigned is False
    assert action.name == f"{signing}:{operation}"
    assert action.summary.startswith(action.name) and f"({region})" in action.summary


@pytest.mark.parametrize("method, operation, params", [
    ("GET", "get_object", {"Bucket": "my-bucket", "Key": "k/x.txt"}),
    ("PUT", "put_object", {"Bucket": "my-bucket", "Key": "up/load"}),
    ("DELETE", "delete_object", {"Bucket": "my-bucket", "Key": "gone"}),
])
@pytest.mark.parametrize("endpoint_url", [None, LOCAL_S3])
def test_presigned_s3_urls(aws_client, url_request, method, operation, params, endpoint_url):
    client = aws_client("s3", "us-west-2", endpoint_url, Config(signature_version="s3v4"))
    url = client.generate_presigned_url(operation, Params=params, ExpiresIn=300)
    action = classify(url_request(method, url), "aws")
    assert action.errors == ()
    assert action.aws.presigned is True
    assert (action.aws.service, action.aws.region) == ("s3", "us-west-2")
    assert action.aws.operation == "".join(p.title() for p in operation.split("_"))
    assert action.aws.resources == (params["Bucket"], f"{params['Bucket']}/{params['Key']}")
    assert action.summary.endswith(" presigned")


def test_presigned_sigv2_url_falls_back_to_host(aws_client, url_request):
    client = aws_client("s3", config=Config(signature_version="s3"))
    url = client.generate_presigned_url("get_object", Params={"Bucket": "my-bucket", "Key": "k"})
    action = classify(url_request("GET", url), "aws")
    assert action.aws.presigned is True
    assert (action.aws.service, action.aws.operation) == ("s3", "GetObject")
    assert action.aws.resources == ("my-bucket", "my-bucket/k")
    assert any("not SigV4-signed" in e for e in action.errors)


def _signed(method, host, path="/", query="", service="s3", region="us-east-1", headers=(), body=b""):
    auth = (f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/{region}/{service}/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=0000")
    return HTTPRequest(method, "https", host, 443, path, query,
                       (("Authorization", auth),) + tuple(headers), body)


FORM = (("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),)

HANDMADE = [
    ("s3-vhost-dotted-bucket", _signed("GET", "my.dotted.bucket.s3.us-east-1.amazonaws.com", "/k"),
     ("s3", "GetObject", ("my.dotted.bucket", "my.dotted.bucket/k"))),
    ("s3-vhost-bucket-named-like-endpoint", _signed("DELETE", "x.s3.s3.amazonaws.com", "/"),
     ("s3", "DeleteBucket", ("x.s3",))),
    ("s3-vhost-legacy-dash-region", _signed("GET", "b1.s3-us-west-2.amazonaws.com", "/", "list-type=2",
                                            region="us-west-2"),
     ("s3", "ListObjectsV2", ("b1",))),
    ("s3-vhost-dualstack", _signed("GET", "b1.s3.dualstack.eu-west-1.amazonaws.com", "/k",
                                   region="eu-west-1"),
     ("s3", "GetObject", ("b1", "b1/k"))),
    ("s3-path-trailing-slash-is-bucket", _signed("PUT", "s3.amazonaws.com", "/b1/"),
     ("s3", "CreateBucket", ("b1",))),
    ("s3-express-signing-name", _signed("GET", "b--use1-az4--x-s3.s3express-use1-az4.us-east-1.amazonaws.com",
                                        "/k", service="s3express"),
     ("s3express", "GetObject", ("b--use1-az4--x-s3", "b--use1-az4--x-s3/k"))),
    ("sqs-legacy-query-form", _signed("POST", "sqs.us-east-1.amazonaws.com", "/", service="sqs",
                                      headers=FORM, body=b"Action=DeleteQueue&QueueUrl=https%3A%2F%2Fq&Version=2012-11-05"),
     ("sqs", "DeleteQueue", ("https://q",))),
    ("iam-query-string", _signed("GET", "iam.amazonaws.com", "/", "Action=DeleteRole&RoleName=admin&Version=2010-05-08",
                                 service="iam"),
     ("iam", "DeleteRole", ("admin",))),
    ("iam-action-case-insensitive", _signed("POST", "iam.amazonaws.com", "/", service="iam", headers=FORM,
                                            body=b"Action=deleterole&RoleName=admin"),
     ("iam", "DeleteRole", ("admin",))),
    ("rpc-v2-cbor-path", _signed("POST", "monitoring.us-east-1.amazonaws.com",
                                 "/service/GraniteServiceVersion20100801/operation/DeleteAlarms",
                                 service="monitoring", headers=(("Smithy-Protocol", "rpc-v2-cbor"),)),
     ("monitoring", "DeleteAlarms", ())),
    ("execute-api-invoke", _signed("POST", "abc123.execute-api.us-east-1.amazonaws.com", "/prod/orders/7",
                                   service="execute-api"),
     ("execute-api", "Invoke", ("abc123/prod/POST/orders/7",))),
    ("lambda-function-url", _signed("GET", "xyz.lambda-url.us-east-1.on.aws", "/anything", service="lambda"),
     ("lambda", "InvokeFunctionUrl", ("xyz",))),
]


@pytest.mark.parametrize("request_, expected", [pytest.param(r, e, id=i) for i, r, e in HANDMADE])
def test_handmade_requests(request_, expected):
    action = classify(request_, "aws")
    assert action.errors == ()
    assert (action.aws.service, action.aws.operation, action.aws.resources) == expected


def test_protocol_is_recorded_for_handmade():
    cbor = classify(HANDMADE[9][1], "aws")
    assert cbor.aws.protocol == "smithy-rpc-v2-cbor"
    sqs = classify(HANDMADE[6][1], "aws")
    assert sqs.aws.protocol == "query"


def test_sigv4a_scope_takes_region_set_header():
    auth = ("AWS4-ECDSA-P256-SHA256 Credential=AKIDEXAMPLE/20240101/s3/aws4_request, "
            "SignedHeaders=host, Signature=00")
    request = HTTPRequest("GET", "https", "mrap.accesspoint.s3-global.amazonaws.com", 443, "/k", "",
                          (("Authorization", auth), ("X-Amz-Region-Set", "*")))
    scope = parse_scope({"authorization": auth, "x-amz-region-set": "*"}, {})
    assert (scope.service, scope.region) == ("s3", "*")
    assert classify(request, "aws").aws.region == "*"


@pytest.mark.parametrize("host, service, operation, region", [
    ("iam.amazonaws.com", "iam", "ListRoles", ""),
    ("secretsmanager.us-east-1.amazonaws.com", "secretsmanager", "ListSecrets", "us-east-1"),
])
def test_unsigned_requests_guess_service_from_host(host, service, operation, region):
    if service == "iam":
        request = HTTPRequest("POST", "https", host, 443, "/", "", FORM, b"Action=ListRoles")
    else:
        request = HTTPRequest("POST", "https", host, 443, "/", "",
                              (("X-Amz-Target", "secretsmanager.ListSecrets"),), b"{}")
    action = classify(request, "aws")
    assert (action.aws.service, action.aws.operation, action.aws.region) == (service, operation, region)
    assert any("not SigV4-signed" in e for e in action.errors)


def test_unsigned_unknown_host_is_noted():
    action = classify(HTTPRequest("GET", "https", "example.com", 443, "/x"), "aws")
    assert action.aws.service == "" and action.aws.operation == ""
    assert action.name == "aws:unknown"
    assert action.errors


@pytest.mark.parametrize("request_, fragment", [
    (_signed("POST", "secretsmanager.us-east-1.amazonaws.com", service="secretsmanager",
             headers=(("X-Amz-Target", "secretsmanager.NoSuchThing"),), body=b"{}"), "not in the"),
    (_signed("GET", "s3.amazonaws.com", "/b", service="nosuchservice"), "no botocore model"),
    (_signed("POST", "iam.amazonaws.com", service="sts", headers=FORM, body=b"Action=CreateRole&RoleName=x"),
     "signed for 'sts' but sent to 'iam'"),
    (_signed("POST", "iam.amazonaws.com", service="iam", headers=FORM,
             body=b"Action=GetUser&Action=DeleteUser&UserName=x"), "conflicting Action"),
    (_signed("PATCH", "s3.amazonaws.com", "/b/k"), "no s3 operation matches"),
    (_signed("POST", "secretsmanager.us-east-1.amazonaws.com", service="secretsmanager",
             headers=(("X-Amz-Target", "secretsmanager.GetSecretValue"),), body=b"{not json"), "not JSON"),
])
def test_problems_are_recorded_not_raised(request_, fragment):
    action = classify(request_, "aws")
    assert any(fragment in error for error in action.errors), action.errors
    assert action.name and action.summary


@pytest.mark.parametrize("request_", [
    _signed("POST", "iam.amazonaws.com", service="iam", headers=FORM,
            body=b"Action=GetUser&Action=DeleteUser&UserName=x"),
    _signed("POST", "iam.amazonaws.com", "/", "Action=GetUser", service="iam", headers=FORM,
            body=b"Action=DeleteUser&UserName=x"),
    _signed("POST", "secretsmanager.us-east-1.amazonaws.com", service="secretsmanager", body=b"{}",
            headers=(("X-Amz-Target", "secretsmanager.ListSecrets"),
                     ("X-Amz-Target", "secretsmanager.DeleteSecret"))),
])
def test_ambiguous_operations_stay_unknown(request_):
    action = classify(request_, "aws")
    assert action.aws.operation == "" and action.name.endswith(":*")
    assert any("conflicting" in e for e in action.errors)


def test_unknown_operation_keeps_the_requested_name():
    request = _signed("POST", "secretsmanager.us-east-1.amazonaws.com", service="secretsmanager",
                      headers=(("X-Amz-Target", "secretsmanager.NoSuchThing"),), body=b"{}")
    assert classify(request, "aws").name == "secretsmanager:NoSuchThing"
    assert classify(_signed("PATCH", "s3.amazonaws.com", "/b/k"), "aws").name == "s3:*"


@pytest.mark.parametrize("host, expected", [
    ("my-bucket.s3.amazonaws.com", ("s3", "", "my-bucket")),
    ("my-bucket.s3.eu-west-1.amazonaws.com", ("s3", "eu-west-1", "my-bucket")),
    ("a.b.s3-accelerate.amazonaws.com", ("s3", "", "a.b")),
    ("s3.amazonaws.com", ("s3", "", "")),
    ("123.s3-control.us-east-1.amazonaws.com", ("s3-control", "us-east-1", "")),
    ("kms-fips.us-gov-west-1.amazonaws.com", ("kms", "us-gov-west-1", "")),
    ("sts.cn-north-1.amazonaws.com.cn", ("sts", "cn-north-1", "")),
    ("api.ecr.us-east-1.amazonaws.com", ("api.ecr", "us-east-1", "")),
    ("runtime.sagemaker.eu-west-1.amazonaws.com", ("runtime.sagemaker", "eu-west-1", "")),
    ("127.0.0.1", ("", "", "")),
    ("bucket.localhost", ("", "", "")),
])
def test_parse_host(host, expected):
    info = parse_host(host)
    assert (info.endpoint_prefix, info.region, info.bucket) == expected


def test_signing_name_map_comes_from_botocore_models():
    assert [m.name for m in aws_models.by_signing_name("monitoring")] == ["cloudwatch"]
    assert [m.name for m in aws_models.by_signing_name("states")] == ["stepfunctions"]
    s3_family = [m.name for m in aws_models.by_signing_name("s3")]
    assert s3_family[0] == "s3" and "s3control" in s3_family
    assert aws_models.index()["secretsmanager"].target_prefix == "secretsmanager"
    assert aws_models.index()["dynamodb"].target_prefix.startswith("DynamoDB_")


def test_service_models_are_built_once_and_cached():
    first = aws_models.service("iam")
    assert first is aws_models.service("iam")
    assert first.canonical_operation("createrole") == "CreateRole"
    assert aws_models.service("no-such-service") is None
