//! How a batch is split into the groups one statement can serve, for both
//! stores' group commit: claims by retention (keyed and keyless records
//! keep theirs, and a claim statement takes one retention as a parameter),
//! lease orders by their terms.

/// Splits `items` into groups whose members are all `same` as the group's
/// first; each group keeps arrival order, and the groups are in the order
/// of their first items.
pub(crate) fn groups<T>(
    items: impl IntoIterator<Item = T>,
    same: impl Fn(&T, &T) -> bool,
) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    for item in items {
        match groups.iter_mut().find(|g| same(&g[0], &item)) {
            Some(group) => group.push(item),
            None => groups.push(vec![item]),
        }
    }
    groups
}

/// Splits claims by their `retention`, as [`groups`] does: one statement
/// per retention, each group with its retention.
pub(crate) fn by_retention<T, R: PartialEq + Copy>(
    items: impl IntoIterator<Item = T>,
    retention: impl Fn(&T) -> R,
) -> Vec<(R, Vec<T>)> {
    groups(items, |a, b| retention(a) == retention(b))
        .into_iter()
        .map(|group| (retention(&group[0]), group))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_arrival_order_within_and_between_them() {
        let grouped = groups([1, 12, 3, 14, 5], |a, b| a / 10 == b / 10);

        assert_eq!(grouped, [vec![1, 3, 5], vec![12, 14]]);
    }

    #[test]
    fn claims_are_split_by_retention_each_group_with_its_own() {
        let claims = [("a", 60), ("b", 3600), ("c", 60)];

        let grouped = by_retention(claims, |c| c.1);

        assert_eq!(
            grouped,
            [(60, vec![("a", 60), ("c", 60)]), (3600, vec![("b", 3600)])]
        );
    }

    #[test]
    fn nothing_to_split_is_no_group() {
        assert!(by_retention(Vec::<(u8, u8)>::new(), |c| c.1).is_empty());
    }
}
