//! Guest RAM: plain local memory, or remote memory behind the ExCache.
pub mod guest;
