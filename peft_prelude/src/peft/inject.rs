//! What every PEFT method injects with: choosing the module paths a config targets, wrapping
//! the projection at a path in the method's layer, and walking the wrapped layers.

use super::config::{LayerIndices, TargetModules};
use super::targets::select;
use crate::error::{Error, Result};
use crate::model::{Linear, Model};

/// The projection paths of `model` that `targets` names (minus `exclude`, within `layers`);
/// a name that matches nothing is an error suggesting close ones.
pub(crate) fn target_paths(
    model: &Model,
    targets: &TargetModules,
    exclude: Option<&TargetModules>,
    layers: Option<&LayerIndices>,
) -> Result<Vec<String>> {
    select(&model.linear_paths(), targets, exclude, layers, &|name| {
        if name.contains('.') {
            return model.unknown_module(name);
        }
        // A bare name like "q_prj": suggest among the model's short names.
        let short: Vec<String> = model
            .config()
            .projection_names()
            .iter()
            .map(|(_, s)| s.to_string())
            .chain(["lm_head".to_string()])
            .collect();
        let mut close: Vec<String> = short.iter().filter(|s| similar(name, s)).cloned().collect();
        if close.is_empty() {
            close = short;
        }
        Error::UnknownModule {
            name: name.to_string(),
            close_matches: close,
        }
    })
}

fn similar(a: &str, b: &str) -> bool {
    let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    common >= 2 || b.contains(a) || a.contains(b)
}

/// Wraps the linear at `path` in `T` (unless it already is one) and calls `add` on it; on an
/// error the layer is left as it was.
pub(crate) fn wrap<T: Linear + 'static>(
    model: &mut Model,
    path: &str,
    make: impl FnOnce(Box<dyn Linear>) -> T,
    add: impl FnOnce(&mut T) -> Result<()>,
) -> Result<()> {
    model.replace_linear(path, |old| {
        let mut layer: Box<T> = if old.as_any().is::<T>() {
            old.into_any().downcast::<T>().expect("type checked above")
        } else {
            Box::new(make(old))
        };
        match add(&mut layer) {
            Ok(()) => Ok(layer),
            Err(e) => Err((layer, e)),
        }
    })
}

/// Every projection of type `T`, with its path.
pub(crate) fn each_linear<T: 'static>(model: &Model) -> Vec<(String, &T)> {
    model
        .linear_paths()
        .into_iter()
        .filter_map(|p| {
            let l = model.linear(&p).ok()?;
            l.as_any().downcast_ref::<T>().map(|t| (p, t))
        })
        .collect()
}

/// Calls `f` on every projection of type `T`.
pub(crate) fn each_linear_mut<T: 'static>(
    model: &mut Model,
    mut f: impl FnMut(&str, &mut T) -> Result<()>,
) -> Result<()> {
    for p in model.linear_paths() {
        let mut result = Ok(());
        model.replace_linear(&p, |mut l| {
            if let Some(t) = l.as_any_mut().downcast_mut::<T>() {
                result = f(&p, t);
            }
            Ok(l)
        })?;
        result?;
    }
    Ok(())
}
