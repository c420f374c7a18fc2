-- Node identities (ADR-0015): the Ed25519 public key a host's agent enrolled with
-- (host.identity_bound, folded by the 'scheduling' projection; raw 32 bytes, base64url
-- without padding). NULL until the host enrols; requests signed with this key
-- (Authorization: EmberNode ...) act for the host. docs/specs/api.md, "Authentication".
ALTER TABLE view_hosts ADD COLUMN public_key text;
