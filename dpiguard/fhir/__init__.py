"""FHIR R4 knowledge: which patients a FHIR request names and an answer holds, and how answers are filtered.

* :mod:`.compartment` - the R4 Patient CompartmentDefinition as data, and request analysis;
* :mod:`.response`    - checks of returned resources, Bundle filtering, masking, link rewriting.

Pure functions over parsed requests and JSON. The mapping to dpiguard's categories (``fhir.yaml``) is
read by :mod:`dpiguard.policy.fhir`; applying all this to a request is the FHIR step of the decision
(:mod:`dpiguard.decision.fhir`).
"""
