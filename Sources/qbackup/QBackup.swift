import ArgumentParser
import FoundationEssentials
import Glibc

/// The qbackup command line: parses, calls one library entry point per
/// command, renders the result. No format logic lives here.
@main
struct QBackup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qbackup",
        abstract: "QEMU qcow2 images, persistent dirty bitmaps and incremental backup chains.",
        discussion: """
            Reads and writes qcow2 images exactly as QEMU does. Errors go to stderr as one \
            'qbackup: error:' line; exit status 0 is success, 1 a failed operation, 2 a usage \
            error, 75 busy: the repository is locked by another qbackup or the image by QEMU (try \
            again later; 'check' and 'compare' use qemu-img's statuses).
            """,
        version: "qbackup \(version) (commit \(BuildInfo.commit), built \(BuildInfo.date))",
        subcommands: [
            InfoCommand.self,
            MapCommand.self,
            CompareCommand.self,
            FlattenCommand.self,
            ListCommand.self,
            RestoreCommand.self,
            CheckCommand.self,
            CreateCommand.self,
            CommitCommand.self,
            BackupCommand.self,
            MergeCommand.self,
            RepairCommand.self,
            VerifyCommand.self,
            SendCommand.self,
            ReceiveCommand.self,
            ReplicateCommand.self,
            BitmapCommand.self,
        ]
    )

    /// The release number; `--version` adds the commit and build date (`BuildInfo`, generated
    /// at build time by scripts/build-info.sh through the BuildInfo plugin).
    static let version = "0.1.0"

    /// Custom entry so usage errors exit 2 (as DESIGN.md says) instead of 64.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch let exit as ExitCode {
            Glibc.exit(exit.rawValue)
        } catch {
            let code = exitCode(for: error)
            if code == .validationFailure {
                let message = self.message(for: error)
                standardError("qbackup: error: \(message)\n")
                JSONReport.usageError(message, arguments: Array(CommandLine.arguments.dropFirst()))
                standardError("Run 'qbackup --help' (or 'qbackup COMMAND --help') for usage.\n")
                Glibc.exit(ExitStatus.usage)
            }
            self.exit(withError: error)
        }
    }
}
