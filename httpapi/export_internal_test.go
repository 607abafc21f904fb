package httpapi

// StatusRetryAfter exposes statusRetryAfter to the black-box tests.
var StatusRetryAfter = statusRetryAfter
