extension QCowChecker {
    /// Opens one image file for checking (its backing chain is not needed),
    /// writable and allowing a corrupt or dirty image when `repair` is set.
    public static func open(_ path: String, repair: RepairMode) throws -> QCowFile {
        let writable = repair != .none
        return try ImageOpener.openQCow(path, writable: writable, forCheck: true)
    }
}
