# The twistd plugin: one lazy ServiceMaker, so "twistd --help" stays cheap
# and xraytwisted is only imported when "twistd xray" actually runs.
from twisted.application.service import ServiceMaker

xray = ServiceMaker(
    "AWS X-Ray daemon",
    "xraytwisted.tap",
    "Receive X-Ray segments over UDP/TCP and upload them to AWS X-Ray (SigV4, treq).",
    "xray",
)
