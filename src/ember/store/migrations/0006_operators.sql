-- Platform operators (user.operator_granted / user.operator_revoked on the user's stream):
-- the 'tenancy' projection keeps the bit on the user. docs/specs/api.md, "Operators".
ALTER TABLE view_users ADD COLUMN operator boolean NOT NULL DEFAULT false;
