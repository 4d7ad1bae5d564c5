"""FHIR-aware enforcement: which patients a FHIR request or response touches, and what a role may see.

* :mod:`.compartment` - the R4 Patient CompartmentDefinition as data, and request analysis;
* :mod:`.categories`  - ``policies/fhir.yaml``: resource types (and codes) -> data categories, search
  modes, allowed probing parameters, masks per role and category;
* :mod:`.response`    - response checks, Bundle filtering, masking;
* :mod:`.enforce`     - glue used by the pipeline (request) and the addon (body, response).
"""
