//! Accounts: who may register, with what.

use validator::ValidateEmail;

use super::FieldError;
use crate::auth::Role;

/// Shortest accepted password (NIST SP 800-63B's floor for user-chosen secrets).
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest accepted password: hashing cost grows with length; this bounds it.
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// A validated registration. The e-mail is kept as given; uniqueness ignores case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccount {
    pub email: String,
    pub password: String,
    pub role: Role,
}

impl NewAccount {
    pub fn parse(email: &str, password: &str, role: &str) -> Result<NewAccount, Vec<FieldError>> {
        let mut errors = Vec::new();
        let email = email.trim();
        if email.len() > 254 || !email.validate_email() {
            errors.push(FieldError::new("email", "must be a valid e-mail address"));
        }
        errors.extend(check_password("password", password));
        let role = match role {
            "bidder" => Some(Role::Bidder),
            "seller" => Some(Role::Seller),
            _ => {
                errors.push(FieldError::new("role", "must be bidder or seller"));
                None
            }
        };
        match role {
            Some(role) if errors.is_empty() => {
                Ok(NewAccount { email: email.to_owned(), password: password.to_owned(), role })
            }
            _ => Err(errors),
        }
    }
}

/// What is wrong with a new password given in `field`, if anything.
pub fn check_password(field: &'static str, password: &str) -> Option<FieldError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        Some(FieldError::new(field, "must be at least 8 characters"))
    } else if chars > MAX_PASSWORD_CHARS {
        Some(FieldError::new(field, "must be at most 1024 characters"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(r: Result<NewAccount, Vec<FieldError>>) -> Vec<&'static str> {
        r.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_valid_registration_parses() {
        let a = NewAccount::parse(" ann@example.com ", "correct horse", "seller").unwrap();
        assert_eq!(a.email, "ann@example.com");
        assert_eq!(a.role, Role::Seller);
    }

    #[test]
    fn every_invalid_field_is_reported() {
        assert_eq!(fields(NewAccount::parse("not-an-email", "short", "admin")), ["email", "password", "role"]);
        assert_eq!(fields(NewAccount::parse("a@", "long enough", "bidder")), ["email"]);
        assert_eq!(fields(NewAccount::parse("", "long enough", "bidder")), ["email"]);
        assert_eq!(fields(NewAccount::parse("a@b.io", &"x".repeat(1025), "bidder")), ["password"]);
    }

    #[test]
    fn a_new_password_is_checked_under_its_own_field_name() {
        assert_eq!(check_password("new_password", "short").map(|e| e.field), Some("new_password"));
        assert_eq!(check_password("new_password", "long enough"), None);
    }

    #[test]
    fn admins_cannot_register_themselves() {
        assert_eq!(fields(NewAccount::parse("a@b.io", "long enough", "admin")), ["role"]);
    }
}
