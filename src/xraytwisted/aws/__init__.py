"""AWS plumbing: SigV4 signing, credentials, region, instance metadata and X-Ray
endpoints.  Everything but credentials is pure logic, no reactor.
"""
