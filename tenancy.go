package kiln

import "fmt"

// Tenancy says what a token without access/ scopes may read.
//
// Kiln's tenants are the access/ codes of meta.security (AccessSystem). A
// server that serves one organisation has no use for them, and standard SMART
// clients never ask for access/ scopes; a server that holds several
// organisations' records (the Helix contract) must refuse a token that names
// no tenant rather than guess.
type Tenancy string

const (
	// TenancyNone (the default): access/ scopes are optional. A token without
	// one reads every record its resource scopes allow; a token with access/
	// scopes is still limited to those codes.
	TenancyNone Tenancy = "none"
	// TenancyAccessTags is the Helix contract: every token must carry access/
	// scopes, and one without them may read, write or export no record.
	TenancyAccessTags Tenancy = "access-tags"
)

// ParseTenancy reads a --tenancy value; empty means TenancyNone.
func ParseTenancy(s string) (Tenancy, error) {
	switch Tenancy(s) {
	case "", TenancyNone:
		return TenancyNone, nil
	case TenancyAccessTags:
		return TenancyAccessTags, nil
	}
	return "", fmt.Errorf("tenancy %q is not known: use %s or %s", s, TenancyNone, TenancyAccessTags)
}
