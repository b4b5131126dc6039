"""The xraytwisted test suite.

Importing it, which every runner does before any test module, isolates the
process environment from the developer's AWS and proxy settings and turns
EC2 instance metadata off (``tests.support.environ``), so no test can reach
a real metadata address or AWS.
"""

from tests.support.environ import isolate_this_process

isolate_this_process()
